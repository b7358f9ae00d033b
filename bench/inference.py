"""Inference throughput: radgate's serving path against the bare network and the seed's way.

All four cases run in one process on the same images (the sample PNGs under `--data`):

  (a) bare model forward, batch 16, on tensors prepared beforehand (the ceiling);
  (b) radgate's full path, batch 16: decode + preprocess + `Classifier.predict`;
  (c) (b) plus Grad-CAM: heat maps, upsampled onto each original and rendered as the
      overlay image (everything `radgate predict --gradcam` does except writing PNGs);
  (d) the seed's way: a fastai Learner's `learn.predict`, one image at a time;
  (p) for the breakdown of (b): its decode + preprocess alone.

Each case is warmed up on one batch, then timed `--repeats` rounds, the cases taking turns
within a round; the median counts. With CUDA, (a)-(c)
are also timed with bf16 autocast and channels_last. Ratios are what to compare across
machines, never the absolute figures.

    .venv/bin/python bench/inference.py --data DATA --model MODEL_DIR [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"b_over_a": 0.5, "c_over_a": 0.33, "b_over_d": 5.0}


@dataclass
class Case:
    key: str
    description: str
    images: int
    run: Callable[[], object] = field(repr=False)
    warm_up: Callable[[], object] = field(repr=False)
    seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_s(self) -> float:
        return self.images / self.median_s

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "images": self.images,
            "seconds": self.seconds,
            "median_s": self.median_s,
            "images_per_s": self.images_per_s,
        }


def measure_all(cases: Sequence[Case], repeats: int, synchronize: Callable[[], None]) -> None:
    """Warm every case up once, then time them round-robin, `repeats` rounds.

    Round-robin rather than case after case: on a shared machine the load drifts, and
    interleaving spreads that drift over all cases instead of skewing one ratio.
    """
    for case in cases:
        case.warm_up()  # lazy imports, allocator, kernel selection, font loading
        synchronize()
    for round_number in range(repeats):
        for case in cases:
            started = time.perf_counter()
            case.run()
            synchronize()
            case.seconds.append(time.perf_counter() - started)
        print(f"  round {round_number + 1}/{repeats} done", flush=True)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Reading:
    """How (b), (c) and (p) read their files: as `radgate predict` does by default."""

    spec: Any
    batch_size: int
    workers: int
    prefetch: bool

    def batches(self, paths: Sequence[Path]) -> Iterator[list[Any]]:
        from inference.commands import read_batches

        for results in read_batches(paths, self.spec, self.batch_size, self.workers, self.prefetch):
            if any(result.prepared is None for result in results):
                failed = [f"{r.path}: {r.error}" for r in results if r.prepared is None]
                raise SystemExit("unreadable sample: " + "; ".join(failed))
            yield [result.prepared for result in results]


def preprocess_only(paths: Sequence[Path], reading: Reading) -> None:
    for _ in reading.batches(paths):
        pass


def bare_forward(model: Any, batches: Sequence[Any], precision: AbstractContextManager) -> None:
    import torch

    with torch.inference_mode(), precision:
        for batch in batches:
            model(batch)


def full_path(
    classifier: Any, paths: Sequence[Path], reading: Reading, precision: AbstractContextManager
) -> None:
    for items in reading.batches(paths):
        with precision:
            classifier.predict([item.tensor for item in items])


def full_path_with_gradcam(
    classifier: Any, paths: Sequence[Path], reading: Reading, precision: AbstractContextManager
) -> None:
    from inference.commands import overlay_image, predict_with_gradcam

    for items in reading.batches(paths):
        with precision:
            maps, predictions = predict_with_gradcam(classifier, [item.tensor for item in items])
        for index, (item, prediction) in enumerate(zip(items, predictions, strict=True)):
            overlay_image(
                item,
                maps.heatmaps[index],
                reading.spec,
                prediction.label,
                prediction.probability,
                "Grad-CAM",
            )


def fastai_learner(model_dir: Path, data_dir: Path) -> Any:
    """The seed's Learner with this model's weights: built by training's own glue."""
    from safetensors.torch import load_file

    from inference.artifact import ModelCard
    from training.data import ImageCache, scan_dataset
    from training.train import Recipe, build_dataloaders, build_learner

    card = ModelCard.read(model_dir)
    recipe = Recipe(arch=card.arch, preprocessing=card.preprocessing, weights=None)
    augmentation = card.raw.get("recipe", {}).get("augmentation")
    if augmentation:
        recipe.augmentation = dict(augmentation)

    class Uncached(ImageCache):
        """The seed's `learn.predict(path)` decodes the file on every call; so does this.

        Training's own loading (same pixels as in training), with the cache emptied after
        each image.
        """

        def load(self, path: Path) -> Any:
            try:
                return super().load(path)
            finally:
                self._images.clear()

    dataset = scan_dataset(data_dir)
    dls = build_dataloaders(
        dataset.split("train"),
        dataset.split("val"),
        card.classes,
        Uncached(card.preprocessing),
        recipe,
    )
    learn = build_learner(dls, recipe)
    learn.model.load_state_dict(load_file(str(model_dir / card.weights_file)), strict=True)
    learn.model.eval()
    return learn, dataset


def seed_predict(learn: Any, items: Sequence[Any]) -> None:
    # The progress bar learn.predict draws costs nothing measurable; it only floods the report.
    with learn.no_bar():
        for item in items:
            learn.predict(item)


# --------------------------------------------------------------------------- report


def ratio(numerator: Case, denominator: Case) -> float:
    return numerator.images_per_s / denominator.images_per_s


def table(cases: Sequence[Case], ratios: dict[str, float]) -> str:
    lines = [
        f"{'case':<5} {'images/s':>9} {'ms/image':>9}  description",
        f"{'-' * 5} {'-' * 9} {'-' * 9}  {'-' * 60}",
    ]
    for case in cases:
        per_image = 1000.0 / case.images_per_s
        lines.append(
            f"{case.key:<5} {case.images_per_s:>9.1f} {per_image:>9.2f}  {case.description}"
        )
    lines.append("")
    lines.append(f"{'ratio':<14} {'measured':>9} {'target':>8}")
    for name, value in ratios.items():
        base = name.replace("_bf16", "")
        target = TARGETS.get(base)
        wanted = f">= {target:g}" if target is not None else ""
        lines.append(f"{name:<14} {value:>9.2f} {wanted:>8}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="sample data folder (PNGs)")
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median counts")
    parser.add_argument("--limit", type=int, default=0, help="use at most N images (0: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=0, help="reader threads (0: default)")
    parser.add_argument("--no-prefetch", action="store_true", help="read each batch in turn")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--skip-seed", action="store_true", help="leave out (d), fastai")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from inference.classifier import Classifier

    torch.set_num_threads(args.threads)
    paths = sorted(args.data.rglob("*.png"))
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        print(f"no PNG files under {args.data}", file=sys.stderr)
        return 2
    classifier = Classifier.from_dir(args.model, device=args.device, batch_size=args.batch_size)
    model, device = classifier.loaded.model, classifier.device
    card = classifier.loaded.card
    spec = card.preprocessing

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    count = len(paths)
    warm_count = min(args.batch_size, count)
    from inference.commands import default_workers

    workers = args.workers or default_workers()
    print(
        f"{count} images, {card.arch} at {spec.size}px, batch {args.batch_size}, {device}, "
        f"{torch.get_num_threads()} torch threads, {workers} reader threads "
        f"({'prefetching' if not args.no_prefetch else 'no prefetch'}), "
        f"median of {args.repeats} rounds",
        flush=True,
    )

    def case(key: str, description: str, run: Callable[[int], object], images: int) -> Case:
        """`run(n)` processes the first n images; the warm-up is one batch's worth."""
        return Case(
            key,
            description,
            images,
            run=lambda: run(images),
            warm_up=lambda: run(min(warm_count, images)),
        )

    reading = Reading(spec, args.batch_size, workers, not args.no_prefetch)
    tensors = [item.tensor for items in reading.batches(paths) for item in items]
    batches = [torch.stack(list(chunk)).to(device) for chunk in chunks(tensors, args.batch_size)]

    def first_batches(n: int, formatted: Sequence[Any]) -> Sequence[Any]:
        return formatted[: -(-n // args.batch_size)]

    fp32 = nullcontext()
    cases = [
        case(
            "a",
            "bare model forward, pre-made tensors",
            lambda n: bare_forward(model, first_batches(n, batches), fp32),
            count,
        ),
        case(
            "b",
            "radgate: decode + preprocess + predict",
            lambda n: full_path(classifier, paths[:n], reading, fp32),
            count,
        ),
        case(
            "c",
            "radgate: (b) + Grad-CAM maps and overlays",
            lambda n: full_path_with_gradcam(classifier, paths[:n], reading, fp32),
            count,
        ),
        case(
            "p",
            "(b)'s decode + preprocess alone, for the breakdown",
            lambda n: preprocess_only(paths[:n], reading),
            count,
        ),
    ]
    if not args.skip_seed:
        learn, dataset = fastai_learner(args.model, args.data)
        wanted = {path.resolve() for path in paths}
        items = [item for item in dataset.items if item.path.resolve() in wanted]
        if device.type == "cuda":
            learn.dls.to(device)
            learn.model.to(device)
        cases.append(
            case(
                "d",
                "seed: fastai learn.predict, one at a time",
                lambda n: seed_predict(learn, items[:n]),
                len(items),
            )
        )
    measure_all(cases, args.repeats, synchronize)
    if device.type == "cuda":
        bf16 = torch.autocast("cuda", dtype=torch.bfloat16)
        # cuDNN picks channels_last for a convolution when its weight is channels_last,
        # so converting the model is enough; the pre-made batches are converted too.
        model.to(memory_format=torch.channels_last)
        last = [batch.contiguous(memory_format=torch.channels_last) for batch in batches]
        fast = [
            case(
                "a_bf16",
                "(a) with bf16 autocast + channels_last",
                lambda n: bare_forward(model, first_batches(n, last), bf16),
                count,
            ),
            case(
                "b_bf16",
                "(b) with bf16 autocast + channels_last",
                lambda n: full_path(classifier, paths[:n], reading, bf16),
                count,
            ),
            case(
                "c_bf16",
                "(c) with bf16 autocast + channels_last",
                lambda n: full_path_with_gradcam(classifier, paths[:n], reading, bf16),
                count,
            ),
        ]
        measure_all(fast, args.repeats, synchronize)
        cases += fast
    by_key = {item.key: item for item in cases}
    ratios = {
        "b_over_a": ratio(by_key["b"], by_key["a"]),
        "c_over_a": ratio(by_key["c"], by_key["a"]),
    }
    if "d" in by_key:
        ratios["b_over_d"] = ratio(by_key["b"], by_key["d"])
    if "a_bf16" in by_key:
        ratios["b_over_a_bf16"] = ratio(by_key["b_bf16"], by_key["a_bf16"])
        ratios["c_over_a_bf16"] = ratio(by_key["c_bf16"], by_key["a_bf16"])
    print()
    print(table(cases, ratios))
    if args.json_out is not None:
        report = {
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "torch": torch.__version__,
            },
            "model": {"id": classifier.loaded.model_id, "arch": card.arch, "size": spec.size},
            "images": count,
            "batch_size": args.batch_size,
            "reader_threads": workers,
            "prefetch": not args.no_prefetch,
            "repeats": args.repeats,
            "cases": {item.key: item.to_json() for item in cases},
            "ratios": ratios,
            "targets": TARGETS,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    # Run as a file, sys.path[0] is bench/, where this file would shadow the `inference`
    # package; the repository root goes there instead.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(REPO)
    sys.exit(main())
