"""`radgate predict` and `radgate explain` end to end, in-process, on a tiny trained model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from gateway.cli import main
from inference.architectures import ARCHITECTURES, build_model
from inference.artifact import save_model
from inference.overlay import strip_height
from inference.preprocess import PreprocessSpec

CLASSES = {"abd", "chest"}


@pytest.fixture(scope="module")
def test_images(sample_data_dir: Path) -> list[Path]:
    return [
        sample_data_dir / "test" / "abd" / "abd_test.png",
        sample_data_dir / "test" / "chest" / "chest_test.png",
    ]


@pytest.fixture
def bad_files(tmp_path: Path, test_images: list[Path]) -> tuple[Path, Path]:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(test_images[0].read_bytes()[:600])  # a PNG cut off mid-stream
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    return corrupt, text


def _json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def _check_good(record: dict[str, Any]) -> None:
    assert record["error"] is None
    assert record["label"] in CLASSES
    probabilities = record["probabilities"]
    assert set(probabilities) == CLASSES
    assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-5)
    assert record["label"] == max(probabilities, key=probabilities.get)


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_predict_reports_every_file_and_fails_on_bad_ones(
    tiny_model: Path,
    test_images: list[Path],
    bad_files: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    corrupt, text = bad_files
    inputs = [test_images[0], corrupt, test_images[1], text]
    code = main(["predict", "--model", str(tiny_model), "--batch-size", "2", *map(str, inputs)])
    records = _json_lines(capsys.readouterr().out)
    assert code == 1
    assert [record["file"] for record in records] == [str(path) for path in inputs]
    for record in records:
        assert set(record) == {"file", "label", "probabilities", "error"}
    _check_good(records[0])
    _check_good(records[2])
    for record, reason in ((records[1], "pixel data does not decode"), (records[3], "not a")):
        assert record["label"] is None and record["probabilities"] is None
        assert isinstance(record["error"], str) and record["error"].startswith(reason)


def test_predict_walks_folders_in_order_and_exits_0(
    tiny_model: Path, sample_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["predict", "--model", str(tiny_model), str(sample_data_dir / "test")])
    records = _json_lines(capsys.readouterr().out)
    assert code == 0
    assert [Path(record["file"]).name for record in records] == ["abd_test.png", "chest_test.png"]
    for record in records:
        _check_good(record)


def test_predict_batches_give_the_same_answers(
    tiny_model: Path, sample_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = str(sample_data_dir / "val")
    main(["predict", "--model", str(tiny_model), "--batch-size", "16", folder])
    together = _json_lines(capsys.readouterr().out)
    main(["predict", "--model", str(tiny_model), "--batch-size", "3", folder])
    in_threes = _json_lines(capsys.readouterr().out)
    assert len(together) == 10
    for one, other in zip(together, in_threes, strict=True):
        assert one["file"] == other["file"] and one["label"] == other["label"]
        for name in CLASSES:
            assert math.isclose(
                one["probabilities"][name], other["probabilities"][name], rel_tol=1e-4, abs_tol=1e-6
            )


def test_predict_gradcam_writes_one_overlay_per_image(
    tiny_model: Path,
    test_images: list[Path],
    bad_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "overlays"
    inputs = [*test_images, bad_files[0]]
    main(["predict", "--model", str(tiny_model), *map(str, inputs)])
    plain = _json_lines(capsys.readouterr().out)
    code = main(["predict", "--model", str(tiny_model), "--gradcam", str(out), *map(str, inputs)])
    records = _json_lines(capsys.readouterr().out)
    assert code == 1
    for explained, reference in zip(records[:2], plain[:2], strict=True):
        _check_good(explained)
        assert explained["label"] == reference["label"]
        for name in CLASSES:
            assert math.isclose(
                explained["probabilities"][name],
                reference["probabilities"][name],
                rel_tol=1e-4,
                abs_tol=1e-6,
            )
    written = [Path(record["gradcam"]) for record in records[:2]]
    assert len(set(written)) == 2 and all(path.parent == out for path in written)
    for source, overlay in zip(test_images, written, strict=True):
        width, height = _image_size(source)
        assert _image_size(overlay) == (width, height + strip_height(width))
        assert source.stem in overlay.name
    assert records[2]["gradcam"] is None and records[2]["error"]
    assert sorted(out.iterdir()) == sorted(written)


def test_predict_reads_dicom_like_the_png(
    tiny_model: Path, sample_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.samples import make_samples

    samples = tmp_path / "samples"
    make_samples(sample_data_dir, samples, "test", variants=True)
    main(["predict", "--model", str(tiny_model), str(sample_data_dir / "test")])
    png = {Path(r["file"]).stem: r for r in _json_lines(capsys.readouterr().out)}
    code = main(["predict", "--model", str(tiny_model), str(samples)])
    records = _json_lines(capsys.readouterr().out)
    assert code == 0
    assert len(records) == len(list(samples.rglob("*.dcm")))
    for record in records:
        _check_good(record)
        folder = Path(record["file"]).parent.name
        if folder.endswith("-plain"):
            reference = png["abd_test" if "-abd-" in folder else "chest_test"]
            for name in CLASSES:
                assert math.isclose(
                    record["probabilities"][name],
                    reference["probabilities"][name],
                    rel_tol=1e-4,
                    abs_tol=1e-6,
                )


@pytest.fixture(scope="module")
def untrained_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One model directory per architecture (random weights): explain is about plumbing."""
    models = {}
    for arch in ARCHITECTURES:
        torch.manual_seed(0)
        out = tmp_path_factory.mktemp("untrained") / arch
        spec = PreprocessSpec(size=64, resize=131)
        card = {"arch": arch, "classes": sorted(CLASSES), "preprocessing": spec.to_json()}
        save_model(build_model(arch, 2).eval(), out, card)
        models[arch] = out
    return models


@pytest.mark.parametrize(
    ("arch", "method", "block"),
    [
        ("resnet18", "cam", "-1"),
        ("resnet18", "gradcam", "-3"),
        ("efficientnet_lite0", "gradcam", "-1"),
        ("efficientnet_lite0", "gradcam", "-11"),
    ],
)
def test_explain_writes_overlays(
    untrained_models: dict[str, Path],
    test_images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arch: str,
    method: str,
    block: str,
) -> None:
    out = tmp_path / "explained"
    arguments = ["--model", str(untrained_models[arch]), "--method", method, "--block", block]
    code = main(["explain", *arguments, "--out", str(out), *map(str, test_images)])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    written = sorted(out.iterdir())
    assert len(written) == 2 and len(printed) == 2
    for line in printed:
        assert any(str(path) in line for path in written)
    for source in test_images:
        (overlay,) = [path for path in written if path.name.startswith(f"{source.parent.name}_")]
        width, height = _image_size(source)
        assert _image_size(overlay) == (width, height + strip_height(width))


def test_explain_with_the_trained_model(
    tiny_model: Path, test_images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "explained"
    code = main(["explain", "--model", str(tiny_model), "--out", str(out), str(test_images[1])])
    assert code == 0
    (overlay,) = out.iterdir()
    assert str(overlay) in capsys.readouterr().out


@pytest.mark.parametrize(("arch", "blocks"), [("resnet18", 8), ("efficientnet_lite0", 11)])
def test_explain_rejects_a_block_outside_the_body(
    untrained_models: dict[str, Path],
    test_images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arch: str,
    blocks: int,
) -> None:
    out = tmp_path / "explained"
    block = str(-blocks - 1)
    arguments = ["--model", str(untrained_models[arch]), "--block", block, "--out", str(out)]
    code = main(["explain", *arguments, str(test_images[0])])
    error = capsys.readouterr().err
    assert code == 2
    assert f"--block {block}" in error and f"-{blocks}..-1" in error
    assert len(error.strip().splitlines()) == 1
    assert not out.exists()


def test_explain_cam_needs_matching_channels(
    untrained_models: dict[str, Path],
    test_images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arguments = ["--model", str(untrained_models["efficientnet_lite0"]), "--method", "cam"]
    code = main(["explain", *arguments, "--out", str(tmp_path / "x"), str(test_images[0])])
    assert code == 2
    assert "CAM needs the body's last block" in capsys.readouterr().err


def test_user_errors_are_one_line_and_exit_2(
    tiny_model: Path, tmp_path: Path, test_images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    missing_model = tmp_path / "no-model"
    assert main(["predict", "--model", str(missing_model), str(test_images[0])]) == 2
    assert "model directory does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--model", str(tiny_model), str(empty)]) == 2
    assert "no DICOM, PNG or JPEG files found" in capsys.readouterr().err
    target = ["--target", "knee", "--out", str(tmp_path / "x"), str(test_images[0])]
    assert main(["explain", "--model", str(tiny_model), *target]) == 2
    assert "--target 'knee'" in capsys.readouterr().err
