"""`radgate samples`: the manifest, the DICOM written, and the PNG/DICOM pixel identity."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)

from gateway.cli import main
from inference.preprocess import PreprocessSpec, read_pixels, to_uint8_rgb
from inference.samples import VARIANTS
from inference.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

MANIFEST_KEYS = {
    "path",
    "source_png",
    "variant",
    "modality",
    "body_part",
    "expected_label",
    "expected_gate",
    "expected_reasons",
    "study_uid",
    "sop_instance_uid",
    "patient_name",
}
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def run_samples(data: Path, out: Path, *options: str) -> list[dict[str, Any]]:
    assert main(["samples", "--data", str(data), "--out", str(out), *options]) == 0
    manifest: list[dict[str, Any]] = json.loads((out / "manifest.json").read_text())
    return manifest


@pytest.fixture(scope="module")
def samples(
    tmp_path_factory: pytest.TempPathFactory, sample_data_dir: Path
) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("samples")
    return out, run_samples(sample_data_dir, out, "--variants")


def test_test_split_with_variants_has_every_case(
    samples: tuple[Path, list[dict[str, Any]]], sample_data_dir: Path
) -> None:
    _, manifest = samples
    test_pngs = sorted((sample_data_dir / "test").glob("*/*.png"))
    assert test_pngs, "the test split is empty"
    assert len(manifest) == len(test_pngs) * len(VARIANTS)
    for png in test_pngs:
        variants = [e["variant"] for e in manifest if Path(e["source_png"]) == png.resolve()]
        assert sorted(variants) == sorted(VARIANTS)


def test_manifest_entries_are_complete_and_describe_their_files(
    samples: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, manifest = samples
    for entry in manifest:
        assert entry.keys() >= MANIFEST_KEYS
        path = out / entry["path"]
        assert path.is_file() and not Path(entry["path"]).is_absolute()
        assert Path(entry["source_png"]).is_file()
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == entry["study_uid"]
        assert ds.SeriesInstanceUID == entry["series_uid"]
        assert ds.SOPInstanceUID == entry["sop_instance_uid"]
        assert ds.file_meta.MediaStorageSOPInstanceUID == entry["sop_instance_uid"]
        assert ds.SOPClassUID == entry["sop_class_uid"]
        assert ds.file_meta.TransferSyntaxUID == entry["transfer_syntax"]
        assert str(ds.PatientName) == entry["patient_name"]
        assert ds.PatientID == entry["patient_id"]
        assert ds.AccessionNumber == entry["accession_number"]
        assert ds.Modality == entry["modality"]
        assert (ds.get("BodyPartExamined") or None) == entry["body_part"]
        assert ds.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert ds.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
        for key in ("study_uid", "series_uid", "sop_instance_uid"):
            assert UID_PATTERN.match(entry[key]) and len(entry[key]) <= 64
        assert re.fullmatch(r"RADGATE\^SAMPLE\^[0-9]+", entry["patient_name"])


def test_every_file_is_its_own_study_in_a_folder_not_named_by_uid(
    samples: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, manifest = samples
    for key in ("study_uid", "series_uid", "sop_instance_uid", "accession_number"):
        assert len({entry[key] for entry in manifest}) == len(manifest), key
    folders = [Path(entry["path"]).parent.name for entry in manifest]
    assert len(set(folders)) == len(manifest)
    for entry, folder in zip(manifest, folders, strict=True):
        assert entry["variant"] in folder
        assert Path(entry["source_png"]).stem in folder
        assert not UID_PATTERN.match(folder)
        assert all(entry[key] not in folder for key in ("study_uid", "sop_instance_uid"))


def test_expectations_follow_the_variant_and_the_folder(
    samples: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, manifest = samples
    for entry in manifest:
        label = Path(entry["source_png"]).parent.name
        if entry["variant"] == "ct":
            assert entry["modality"] == "CT"
            assert entry["expected_gate"] == "rejected"
            assert entry["expected_label"] is None
            assert entry["expected_reasons"]
        else:
            assert entry["modality"] in ("CR", "DX")
            assert entry["expected_gate"] == "passed"
            assert entry["expected_label"] == label
            assert entry["expected_reasons"] == []
        right = {"abd": "ABDOMEN", "chest": "CHEST"}[label]
        if entry["variant"] == "body-part-missing":
            assert entry["body_part"] is None
        elif entry["variant"] == "body-part-wrong":
            assert entry["body_part"] not in (None, right)
            assert entry["expected_flags"] == ["body part mismatch"]
        else:
            assert entry["body_part"] == right


def test_plain_wraps_alternate_cr_and_dx(samples: tuple[Path, list[dict[str, Any]]]) -> None:
    _, manifest = samples
    plain = [entry for entry in manifest if entry["variant"] == "plain"]
    assert {entry["sop_class_uid"] for entry in plain} == {
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
    }
    for entry in plain:
        assert entry["transfer_syntax"] == ExplicitVRLittleEndian


def test_variants_carry_what_their_name_says(samples: tuple[Path, list[dict[str, Any]]]) -> None:
    out, manifest = samples
    for entry in manifest:
        ds = pydicom.dcmread(out / entry["path"])
        variant = entry["variant"]
        if variant == "monochrome1":
            assert ds.PhotometricInterpretation == "MONOCHROME1"
        else:
            assert ds.PhotometricInterpretation == "MONOCHROME2"
        if variant == "rescale16":
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
            assert ds.RescaleSlope != 1 and ds.RescaleIntercept != 0
            assert "WindowCenter" in ds and "WindowWidth" in ds
        if variant == "jpeg-baseline":
            assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
            assert ds.LossyImageCompression == "01"
        if variant == "jpeg2000":
            assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
        if variant == "ct":
            assert ds.SOPClassUID == CTImageStorage
        if variant == "plain":
            assert (ds.BitsAllocated, ds.BitsStored) == (8, 8)


def test_plain_wrap_pixels_equal_the_png_exactly(
    samples: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, manifest = samples
    for entry in manifest:
        dicom_pixels = read_pixels(out / entry["path"])
        png_pixels = read_pixels(Path(entry["source_png"]))
        # The sample PNGs are RGB files with three equal channels; the wrap is grey.
        grey = png_pixels[..., 0] if png_pixels.ndim == 3 else png_pixels
        if entry["variant"] == "plain":
            assert entry["pixels_equal_png"]
        if entry["pixels_equal_png"]:
            assert np.array_equal(dicom_pixels, grey), entry["path"]
            spec = PreprocessSpec()
            assert np.array_equal(to_uint8_rgb(dicom_pixels, spec), to_uint8_rgb(png_pixels, spec))
        elif entry["variant"] == "monochrome1":
            np.testing.assert_allclose(dicom_pixels, grey, atol=1e-6)
        elif entry["variant"] == "jpeg-baseline":
            assert np.abs(dicom_pixels - grey).mean() < 0.01


def test_reruns_write_the_same_files(
    samples: tuple[Path, list[dict[str, Any]]], sample_data_dir: Path, tmp_path: Path
) -> None:
    out, manifest = samples
    again = run_samples(sample_data_dir, tmp_path, "--variants")
    assert [{**e, "source_png": None} for e in again] == [
        {**e, "source_png": None} for e in manifest
    ]
    for entry in manifest:
        assert (tmp_path / entry["path"]).read_bytes() == (out / entry["path"]).read_bytes()


def test_rerun_into_the_same_folder_overwrites_and_leaves_no_temporary_files(
    sample_data_dir: Path, tmp_path: Path
) -> None:
    first = run_samples(sample_data_dir, tmp_path)
    (tmp_path / first[0]["path"]).write_bytes(b"stale")
    second = run_samples(sample_data_dir, tmp_path)
    assert second == first
    assert (
        pydicom.dcmread(tmp_path / first[0]["path"]).SOPInstanceUID == first[0]["sop_instance_uid"]
    )
    assert not [path for path in tmp_path.rglob(".*")]


def test_identical_pngs_get_different_uids(sample_data_dir: Path, tmp_path: Path) -> None:
    manifest = run_samples(sample_data_dir, tmp_path, "--split", "val")
    assert {Path(e["source_png"]).parent.parent.name for e in manifest} == {"val"}
    digests: dict[bytes, list[dict[str, Any]]] = {}
    for entry in manifest:
        digests.setdefault(Path(entry["source_png"]).read_bytes(), []).append(entry)
    duplicates = [entries for entries in digests.values() if len(entries) > 1]
    # The published data set has one such pair (val/abd/abd3.png and abd4.png).
    assert duplicates, "expected a duplicated PNG in the val split"
    for entries in duplicates:
        assert len({entry["study_uid"] for entry in entries}) == len(entries)
        assert len({entry["patient_id"] for entry in entries}) == len(entries)


def test_summary_lists_every_file(sample_data_dir: Path, tmp_path: Path, capsys: Any) -> None:
    manifest = run_samples(sample_data_dir, tmp_path)
    printed = capsys.readouterr().out
    for entry in manifest:
        assert entry["path"] in printed
    assert "manifest.json" in printed


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--data", "{tmp}/absent"], "data folder"),
        (["--data", "{tmp}"], "no PNG files"),
        (["--data", "{data}", "--split", "holdout"], "--split 'holdout'"),
    ],
)
def test_user_errors_are_one_line(
    arguments: list[str], message: str, sample_data_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    filled = [a.format(tmp=tmp_path, data=sample_data_dir) for a in arguments]
    assert main(["samples", *filled, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert error.startswith("radgate samples: error:")
