"""`radgate train` end to end: outputs, refusals, and the real recipe's accuracy and export parity."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gateway.cli import main
from inference.artifact import CARD_FILE, WEIGHTS_FILE, sha256_file
from training.train import MIXED_MIN_SCALES

SEED_OUTPUTS = {
    "lr_find.png",
    "history.csv",
    "losses.png",
    "results.png",
    "top_losses.png",
    "confusion_matrix.png",
    "evaluation.json",
    CARD_FILE,
    WEIGHTS_FILE,
}


def test_tiny_training_writes_every_seed_output(tiny_model: Path) -> None:
    assert {p.name for p in tiny_model.iterdir()} >= SEED_OUTPUTS
    for png in SEED_OUTPUTS:
        if png.endswith(".png"):
            assert (tiny_model / png).stat().st_size > 1000, png
    card = json.loads((tiny_model / CARD_FILE).read_text())
    for key in (
        "arch",
        "classes",
        "input_size",
        "normalize",
        "preprocessing",
        "weights_file",
        "sha256",
        "metrics",
        "recipe",
        "trained_at",
        "versions",
    ):
        assert key in card, key
    assert card["classes"] == ["abd", "chest"]
    assert card["sha256"] == sha256_file(tiny_model / WEIGHTS_FILE)
    assert card["recipe"]["seed"] == 42 and card["recipe"]["batch_size"] == 16
    # The default soup's members crop differently, and the card says how.
    assert card["recipe"]["member_min_scales"] == list(MIXED_MIN_SCALES)
    with (tiny_model / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    # fine_tune trains one frozen epoch before the requested one, in every soup member
    per_member = 2 if card["recipe"]["schedule"] == "fine_tune" else 1
    assert card["recipe"]["soup"] >= 1
    assert len(rows) == per_member * card["recipe"]["soup"]
    assert [int(row["member"]) for row in rows] == [
        member for member in range(1, card["recipe"]["soup"] + 1) for _ in range(per_member)
    ]
    assert {"train_loss", "valid_loss", "accuracy"} <= set(rows[0])
    evaluation = json.loads((tiny_model / "evaluation.json").read_text())
    assert len(evaluation["valid"]) == 10 and len(evaluation["test"]) == 2
    row = evaluation["test"][0]
    assert {"file", "label", "prediction", "probability", "loss"} <= set(row)
    assert card["metrics"]["export_parity_max_abs_diff"] < 1e-5
    # Where the model looks: the review sheet and the border-attention figures.
    assert (tiny_model / "gradcam_review.png").stat().st_size > 1000
    shares = [row["border_share"] for row in evaluation["border_attention"]]
    assert len(shares) == 12 and all(0.0 <= share <= 1.0 for share in shares)
    assert card["metrics"]["gradcam_border_share_max"] == pytest.approx(max(shares), abs=1e-4)


def test_existing_output_folder_is_refused(
    tmp_path: Path, sample_data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    assert main(["train", "--data", str(sample_data_dir), "--out", str(out)]) == 2
    assert f"{out}: output folder exists" in capsys.readouterr().err


def test_weights_of_the_wrong_architecture_leave_nothing_behind(
    tmp_path: Path, sample_data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = tmp_path / "not-resnet.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, weights)
    out = tmp_path / "model"
    code = main(
        [
            "train",
            "--data",
            str(sample_data_dir),
            "--out",
            str(out),
            "--weights",
            str(weights),
            "--arch",
            "resnet18",
            "--epochs",
            "1",
            "--size",
            "64",
        ]
    )
    assert code == 2
    assert "not a ResNet18 state dict" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [weights]


def test_missing_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"radgate train: error: {tmp_path / 'none'}: data folder does not exist"]


@pytest.mark.slow
def test_real_recipe_is_accurate_and_export_matches_the_learner(
    trained_model: Path, sample_data_dir: Path
) -> None:
    """The default recipe on the sample data; the model rebuilt from the card equals the
    fastai Learner on the same inputs, and the whole serving path agrees closely."""
    from safetensors.torch import load_file

    from inference.artifact import ModelCard, load_model
    from training.data import ImageCache, scan_dataset
    from training.train import Recipe, build_dataloaders, build_learner, score_items

    card = ModelCard.read(trained_model)
    assert card.raw["metrics"]["valid_accuracy"] >= 0.95
    assert card.raw["metrics"]["export_parity_max_abs_diff"] < 1e-5

    recipe_json = dict(card.raw["recipe"])
    recipe_json["preprocessing"] = card.preprocessing
    recipe_json["weights"] = None  # the trained weights replace any starting point
    recipe = Recipe(**recipe_json)
    dataset = scan_dataset(sample_data_dir)
    cache = ImageCache(card.preprocessing)
    dls = build_dataloaders(
        dataset.split("train"), dataset.split("val"), dataset.classes, cache, recipe
    )
    learn = build_learner(dls, recipe)
    learn.model.load_state_dict(load_file(str(trained_model / WEIGHTS_FILE)))
    learner_probs, targets = learn.get_preds(dl=dls.valid)
    assert (learner_probs.argmax(1) == targets).float().mean() >= 0.95

    rebuilt = load_model(trained_model, device="cpu").model
    inputs = torch.cat([torch.as_tensor(x).clone() for x, _ in dls.valid])
    with torch.inference_mode():
        rebuilt_probs = torch.softmax(rebuilt(inputs), dim=1)
    assert float((rebuilt_probs - learner_probs).abs().max()) < 1e-5

    # The serving path decodes and resizes each image itself (float rounding only).
    served = score_items(trained_model, dataset.split("val"))
    served_probs = np.array([[r["probabilities"][c] for c in card.classes] for r in served])
    assert np.abs(served_probs - learner_probs.numpy()).max() < 1e-3
    assert [r["prediction"] for r in served] == [card.classes[i] for i in learner_probs.argmax(1)]


def test_cross_validation_reports_accuracy_and_misclassified_files(
    tmp_path: Path, sample_data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cv-model"
    code = main(["train", "--data", str(sample_data_dir), "--out", str(out),
                 "--cv", "2", "--cv-seeds", "2", "--epochs", "1", "--size", "64"])  # fmt: skip
    assert code == 0
    cv = json.loads((out / "cross_validation.json").read_text())
    assert cv["folds"] == 2 and cv["seeds"] == [42, 43]
    all_wrong = []
    for run in cv["runs"]:
        assert len(run["per_image"]) == 77  # every labelled image held out once per seed
        assert {row["fold"] for row in run["per_image"]} == {1, 2}
        wrong = [row["file"] for row in run["per_image"] if not row["correct"]]
        assert run["misclassified"] == wrong
        assert run["accuracy"] == pytest.approx(1 - len(wrong) / 77, abs=1e-6)
        assert cv["accuracy_by_seed"][str(run["seed"])] == run["accuracy"]
        all_wrong += [f"{path} (seed {run['seed']})" for path in wrong]
    # Different seeds draw different folds.
    folds_by_seed = [{row["file"]: row["fold"] for row in run["per_image"]} for run in cv["runs"]]
    assert folds_by_seed[0] != folds_by_seed[1]
    assert cv["misclassified"] == sorted(set(all_wrong))
    assert cv["accuracy"] == pytest.approx(1 - len(all_wrong) / 154, abs=1e-6)
    card = json.loads((out / CARD_FILE).read_text())
    assert card["metrics"]["cv_accuracy"] == cv["accuracy"] and card["metrics"]["cv_folds"] == 2
    assert card["metrics"]["cv_accuracy_by_seed"] == cv["accuracy_by_seed"]
    printed = capsys.readouterr().out
    assert "2-fold cross-validation accuracy" in printed
    assert "2-fold cross-validation over 2 seeds: seed 42:" in printed


def test_bad_cv_argument_is_refused(
    tmp_path: Path, sample_data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    assert (
        main(["train", "--data", str(sample_data_dir), "--out", str(tmp_path / "m"), "--cv", "1"])
        == 2
    )
    assert "--cv 1: need at least two folds" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--data",
                str(sample_data_dir),
                "--out",
                str(tmp_path / "m"),
                "--cv",
                "3",
                "--cv-seeds",
                "0",
            ]
        )  # fmt: skip
        == 2
    )
    assert "--cv-seeds 0: must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--detail-side", "-1", "0 (off) or at least 32 pixels"),
        ("--detail-side", "8", "0 (off) or at least 32 pixels"),
        ("--soup", "0", "must be at least 1 (1: a single model)"),
        ("--soup", "-2", "must be at least 1 (1: a single model)"),
    ],
)
def test_bad_recipe_values_are_refused(
    tmp_path: Path,
    sample_data_dir: Path,
    capsys: pytest.CaptureFixture,
    flag: str,
    value: str,
    message: str,
) -> None:
    out = tmp_path / "m"
    argv = ["train", "--data", str(sample_data_dir), "--out", str(out), flag, value]
    assert main(argv) == 2
    assert f"{flag} {value}: {message}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "written"),
    [
        ([], "models/.m.partial-*/lr_find.png"),  # the final model: its learning-rate plot
        (["--cv", "2", "--soup", "1"], "tmp/radgate-cv-*/fold1"),  # a cross-validation fold
    ],
    ids=["final-model", "cross-validation"],
)
def test_a_stopped_training_run_leaves_nothing_behind(
    tmp_path: Path, sample_data_dir: Path, options: list[str], written: str
) -> None:
    """SIGTERM (`kill`, a service manager) during training: the partial output folder and
    the cross-validation scratch are removed and no model folder appears."""
    out = tmp_path / "models" / "m"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    argv = [sys.executable, "-m", "gateway.cli", "train", "--data", str(sample_data_dir),
            "--out", str(out), "--epochs", "3", "--size", "64", *options]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(scratch)}
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 180
        # Stop it once it has written into its partial or scratch folder.
        while not list(tmp_path.glob(written)):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, f"training never wrote {written}"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait(timeout=30)
    assert list(out.parent.iterdir()) == []
    assert list(scratch.glob("radgate-*")) == []  # torch may leave its own caches there
