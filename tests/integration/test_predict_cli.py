"""`radgate predict` and `radgate explain` end to end, in-process, on a tiny trained model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gateway.cli import main
from inference.overlay import strip_height

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
    code = main(["predict", "--model", str(tiny_model), "--gradcam", str(out), *map(str, inputs)])
    records = _json_lines(capsys.readouterr().out)
    assert code == 1
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


@pytest.mark.parametrize(("method", "block"), [("cam", "-1"), ("gradcam", "-1"), ("gradcam", "-3")])
def test_explain_writes_overlays(
    tiny_model: Path,
    test_images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    method: str,
    block: str,
) -> None:
    out = tmp_path / "explained"
    arguments = ["--model", str(tiny_model), "--method", method, "--block", block]
    code = main(["explain", *arguments, "--out", str(out), *map(str, test_images)])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    written = sorted(out.iterdir())
    assert len(written) == 2
    for line in printed:
        assert any(str(path) in line for path in written)
    for source in test_images:
        (overlay,) = [path for path in written if path.name.startswith(f"{source.parent.name}_")]
        width, height = _image_size(source)
        assert _image_size(overlay) == (width, height + strip_height(width))


def test_explain_rejects_a_block_outside_the_body(
    tiny_model: Path, test_images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "explained"
    arguments = ["--model", str(tiny_model), "--block", "-9", "--out", str(out)]
    code = main(["explain", *arguments, str(test_images[0])])
    error = capsys.readouterr().err
    assert code == 2
    assert "--block -9" in error and "-8..-1" in error
    assert not out.exists() or not any(out.iterdir())


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
