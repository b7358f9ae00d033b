"""`radgate predict` and `radgate explain`: the inference engine from the command line.

`predict` prints one JSON object per input file on stdout (JSON lines), so its output can
be piped into other tools; a file that cannot be read gets a line with its error and the
run goes on. `explain` is the seed's CAM / Grad-CAM cells as a command, writing overlays.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.artifact import load_model
from inference.classifier import Classifier, Prediction
from inference.errors import InvalidInput, RadgateError
from inference.gradcam import GradCamResult, body_and_head, cam, gradcam, upsample_to
from inference.overlay import render_overlay, save_png
from inference.preprocess import (
    RASTER_SUFFIXES,
    Prepared,
    PreprocessSpec,
    is_dicom_file,
    prepare,
)

log = logging.getLogger(__name__)

METHOD_TITLES = {"gradcam": "Grad-CAM", "cam": "CAM"}
UNSUPPORTED = "not a DICOM, PNG or JPEG file"
NOT_FOUND = "file not found"


# --------------------------------------------------------------------------- inputs


def is_supported(path: Path) -> bool:
    """A PNG/JPEG (or other raster) by suffix, or DICOM by `.dcm` or the DICM marker."""
    return path.suffix.lower() in RASTER_SUFFIXES or is_dicom_file(path)


def collect_inputs(paths: Sequence[Path]) -> list[Path]:
    """Files as named, and the supported files under each folder (recursive, sorted).

    A file named explicitly is kept even if it is not an image (it gets an error line);
    inside folders, other files (READMEs, sidecars) are skipped. Duplicates are dropped.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(f for f in path.rglob("*") if f.is_file() and is_supported(f))
        else:
            found.append(path)
    seen: set[Path] = set()
    unique = []
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    if not unique:
        named = ", ".join(str(path) for path in paths)
        raise RadgateError(f"no DICOM, PNG or JPEG files found in {named}")
    return unique


@dataclass
class ReadResult:
    path: Path
    prepared: Prepared | None
    error: str | None


def read_input(path: Path, spec: PreprocessSpec) -> ReadResult:
    """Decode and preprocess one file; an unreadable file is an error string, not a raise."""
    if not path.is_file():
        return ReadResult(path, None, NOT_FOUND)
    if not is_supported(path):
        return ReadResult(path, None, UNSUPPORTED)
    try:
        return ReadResult(path, prepare(path, spec), None)
    except InvalidInput as error:
        return ReadResult(path, None, error.reason)
    except Exception as error:  # decoders raise assorted types; one bad file must not end a run
        log.debug("reading %s failed", path, exc_info=True)
        return ReadResult(path, None, str(error) or type(error).__name__)


def _readable(results: Sequence[ReadResult]) -> dict[int, tuple[int, Prepared]]:
    """Position in `results` -> (position in the batch sent to the model, prepared image)."""
    readable: dict[int, tuple[int, Prepared]] = {}
    for position, result in enumerate(results):
        if result.prepared is not None:
            readable[position] = (len(readable), result.prepared)
    return readable


def batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def read_batches(
    files: Sequence[Path],
    spec: PreprocessSpec,
    batch_size: int,
    workers: int = 0,
    prefetch: bool = True,
) -> Iterator[list[ReadResult]]:
    """`read_input` for each batch of files, in order, on a small thread pool.

    Decoding and resizing are mostly single-threaded (PIL, numpy), so `workers` threads
    (default: up to 4, one per core) read a batch in parallel. With `prefetch`, the next
    batch is already being read while the caller runs the model on this one; at most two
    batches are held in memory.
    """
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        pending: list[Future[ReadResult]] | None = None
        for chunk in batches(files, batch_size):
            submitted = [pool.submit(read_input, path, spec) for path in chunk]
            if not prefetch:
                yield [future.result() for future in submitted]
                continue
            if pending is not None:
                yield [future.result() for future in pending]
            pending = submitted
        if pending is not None:
            yield [future.result() for future in pending]


class OverlayNames:
    """Output file names derived from the input path: readable stem + hash of the full path."""

    def __init__(self, out_dir: Path, suffix: str) -> None:
        self.out_dir = out_dir
        self.suffix = suffix
        self._used: set[str] = set()

    def path_for(self, source: Path) -> Path:
        # The folder's name too: DICOM files are often all called IM0001 or similar.
        readable = f"{source.parent.name}_{source.stem}" if source.parent.name else source.stem
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", readable)[-80:].strip("._") or "image"
        digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
        name = f"{stem}-{digest}.{self.suffix}.png"
        counter = 1
        while name in self._used:  # only if two different paths share a hash prefix
            counter += 1
            name = f"{stem}-{digest}-{counter}.{self.suffix}.png"
        self._used.add(name)
        return self.out_dir / name


# --------------------------------------------------------------------------- heat maps


def heat_maps(
    model: torch.nn.Sequential,
    tensors: Sequence[torch.Tensor],
    method: str,
    block: int = -1,
    targets: torch.Tensor | None = None,
) -> GradCamResult:
    """CAM or Grad-CAM for one batch of prepared tensors."""

    batch = torch.stack(list(tensors))
    if method == "cam":
        return cam(model, batch, targets)
    return gradcam(model, batch, targets, block=block)


def overlay_image(
    prepared: Prepared,
    heatmap: torch.Tensor,
    spec: PreprocessSpec,
    label: str,
    probability: float,
    title: str,
) -> np.ndarray:
    """A feature-resolution map drawn over the original image, with its legend strip."""
    height, width = prepared.display.shape[:2]
    full = upsample_to(heatmap, prepared.box, (width, height))
    return render_overlay(prepared.display, full, label, probability, title=title)


def predict_with_gradcam(
    classifier: Classifier, tensors: Sequence[torch.Tensor]
) -> tuple[GradCamResult, list[Prediction]]:
    """Predictions and the Grad-CAM map of each predicted class, from one forward + backward.

    The probabilities come from the Grad-CAM pass itself (same model, eval mode), so the
    map always explains exactly the label reported and the network runs once, not twice.
    """
    started = time.perf_counter()
    maps = heat_maps(classifier.loaded.model, tensors, "gradcam")
    per_image_ms = (time.perf_counter() - started) * 1000 / max(len(tensors), 1)
    classes = classifier.classes
    predictions = [
        Prediction(
            label=classes[int(target)],
            probabilities={name: float(p) for name, p in zip(classes, row, strict=True)},
            model_id=classifier.loaded.model_id,
            inference_ms=per_image_ms,
        )
        for target, row in zip(maps.targets, maps.probabilities.tolist(), strict=True)
    ]
    return maps, predictions


# --------------------------------------------------------------------------- predict


def _check_batch_size(value: int) -> int:
    if value < 1:
        raise RadgateError(f"--batch-size {value}: must be at least 1")
    return value


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")


def predict(args: argparse.Namespace) -> int:
    """`radgate predict`: JSON lines of predictions; exit 1 if any file failed.

    With `--gradcam`, each batch's predictions come from its Grad-CAM pass (see
    `predict_with_gradcam`); without, from `Classifier.predict` under inference mode.
    """
    batch_size = _check_batch_size(args.batch_size)
    files = collect_inputs(args.inputs)
    classifier = Classifier.from_dir(args.model, device=args.device, batch_size=batch_size)
    spec = classifier.loaded.card.preprocessing
    names = None
    if args.gradcam is not None:
        args.gradcam.mkdir(parents=True, exist_ok=True)
        names = OverlayNames(args.gradcam, "gradcam")
    failed = 0
    for results in read_batches(files, spec, batch_size):
        readable = _readable(results)
        tensors = [prepared.tensor for _, prepared in readable.values()]
        maps: GradCamResult | None = None
        predictions: list[Prediction] = []
        if tensors and names is not None:
            maps, predictions = predict_with_gradcam(classifier, tensors)
        elif tensors:
            predictions = classifier.predict(tensors)
        for position, result in enumerate(results):
            record: dict[str, Any] = {"file": str(result.path)}
            if position not in readable:
                failed += 1
                record.update(label=None, probabilities=None, error=result.error)
                if names is not None:
                    record["gradcam"] = None
                _emit(record)
                continue
            index, prepared = readable[position]
            prediction = predictions[index]
            record.update(
                label=prediction.label, probabilities=prediction.probabilities, error=None
            )
            if names is not None and maps is not None:
                picture = overlay_image(
                    prepared,
                    maps.heatmaps[index],
                    spec,
                    prediction.label,
                    prediction.probability,
                    "Grad-CAM",
                )
                record["gradcam"] = str(save_png(picture, names.path_for(result.path)))
            _emit(record)
        sys.stdout.flush()
    return 1 if failed else 0


# --------------------------------------------------------------------------- explain


def _block_for(model: torch.nn.Sequential, arch: str, method: str, block: int) -> int:
    blocks = len(body_and_head(model)[0])
    if not -blocks <= block <= -1:
        raise RadgateError(
            f"--block {block}: the {arch} body has {blocks} blocks; choose -{blocks}..-1 "
            "(-1 is the last)"
        )
    if method == "cam" and block != -1:
        raise RadgateError(
            f"--block {block}: CAM always uses the last block (-1); "
            "use --method gradcam to look at another block"
        )
    return block


def _target_index(classes: Sequence[str], target: str | None) -> int | None:
    if target is None:
        return None
    if target not in classes:
        raise RadgateError(f"--target {target!r}: not one of the model's classes {list(classes)}")
    return list(classes).index(target)


def explain(args: argparse.Namespace) -> int:
    """`radgate explain`: one CAM or Grad-CAM overlay PNG per image in `--out`."""
    batch_size = _check_batch_size(args.batch_size)
    loaded = load_model(args.model, device=args.device)
    model, card = loaded.model, loaded.card
    block = _block_for(model, card.arch, args.method, args.block)
    target = _target_index(card.classes, args.target)
    files = collect_inputs(args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    title = METHOD_TITLES[args.method]
    if args.method == "gradcam":
        title = f"{title} block {block}"
    suffix = args.method if args.method == "cam" else f"gradcam.block{block}"
    names = OverlayNames(args.out, suffix)
    failed = 0
    for results in read_batches(files, card.preprocessing, batch_size):
        for result in results:
            if result.error is not None:
                failed += 1
                print(f"radgate explain: {result.path}: {result.error}", file=sys.stderr)
        readable = _readable(results)
        if not readable:
            continue
        tensors = [prepared.tensor for _, prepared in readable.values()]
        targets = None if target is None else torch.full((len(tensors),), target)
        try:
            maps = heat_maps(model, tensors, args.method, block, targets)
        except ValueError as error:
            raise RadgateError(f"--method {args.method}: {error}") from error
        for position, (index, prepared) in readable.items():
            source = results[position].path
            chosen = int(maps.targets[index])
            label = card.classes[chosen]
            probability = float(maps.probabilities[index, chosen])
            picture = overlay_image(
                prepared, maps.heatmaps[index], card.preprocessing, label, probability, title
            )
            written = save_png(picture, names.path_for(source))
            print(f"{source} -> {written} ({label} p={probability:.2f})", flush=True)
    return 1 if failed else 0
