"""What gateway.outputs writes passes dicom3tools' dciodvfy and DCMTK's dcmdump.

The sources are the `radgate samples` variants (CR, DX, MONOCHROME1, 12-bit, JPEG
Baseline, JPEG 2000, body part missing or wrong, a CT the gate rejects), built in
memory from a synthetic picture, plus non-ASCII patient names in three character sets.
For each: the Grad-CAM SC (when classified), the tagged original and the study's SR.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.outputs import (
    InstanceResult,
    gradcam_secondary_capture,
    result_report,
    tag_original,
    write_dataset,
)
from inference.overlay import render_overlay
from inference.samples import VARIANTS, Source, build_dataset

SHA = "89abcdef01234567" * 4
MODEL = "chest-abd-effnet-v1"
# dciodvfy cannot know radgate's private elements nor its local coding scheme; a CR
# whose body part is unknown carries an empty Laterality (as the samples accept).
ACCEPTED_WARNINGS = (
    "Unrecognized tag - assuming explicit value representation OK",
    "Unrecognized defined term <99RADGATE> for value 1 of attribute <Coding Scheme Designator>",
    "is only permitted to be empty when actually unknown",
)
CHARACTER_SETS = {
    "latin1": ("ISO_IR 100", "Müller^Jörg"),
    "utf8": ("ISO_IR 192", "山田^太郎"),
    "iso2022": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
}


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's report (it writes to stderr), one line per entry."""
    executable = shutil.which("dciodvfy")
    assert executable, "dciodvfy (Debian package dicom3tools, `make system-deps`) is required"
    result = subprocess.run(
        [executable, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]


def dcmdump(path: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("dcmdump")
    assert executable, "dcmdump (Debian package dcmtk, `make system-deps`) is required"
    return subprocess.run(
        [executable, "-q", str(path)],
        capture_output=True,
        # dcmdump prints names in the file's own character set, Latin-1 included.
        encoding="utf-8",
        errors="replace",
        timeout=60,
        check=False,
    )


def problems(lines: list[str]) -> list[str]:
    """Errors, and warnings other than the accepted ones."""
    return [
        line
        for line in lines
        if line.startswith("Error")
        or ("Warning" in line and not any(accepted in line for accepted in ACCEPTED_WARNINGS))
    ]


def sample(variant: str, label: str = "chest") -> Dataset:
    grey = np.add.outer(np.arange(64) * 2, np.arange(64)).clip(0, 255).astype(np.uint8)
    source = Source(Path(f"{label}_synthetic.png"), "test", label, 7, "5a" * 32)
    return build_dataset(source, VARIANTS[variant], grey)


def result_for(variant: str, label: str = "chest") -> InstanceResult:
    if VARIANTS[variant].expected_gate == "rejected":
        return InstanceResult(
            False, VARIANTS[variant].expected_reasons, None, None, None, None, None
        )
    return InstanceResult(
        True,
        (),
        label,
        0.91,
        {label: 0.91, "abd" if label == "chest" else "chest": 0.09},
        MODEL,
        SHA,
        body_part_mismatch=variant == "body-part-wrong",
    )


def overlay_for(ds: Dataset, result: InstanceResult) -> np.ndarray:
    rows, columns = int(ds.Rows), int(ds.Columns)
    grey = np.full((rows, columns), 96, dtype=np.uint8)
    heat = np.outer(np.linspace(0.0, 1.0, rows), np.ones(columns))
    assert result.label is not None and result.probability is not None
    return render_overlay(grey, heat, result.label, result.probability)


def write_outputs(source: Dataset, result: InstanceResult, folder: Path) -> dict[str, Path]:
    """The source as received plus everything radgate makes of it, as files."""
    folder.mkdir()
    paths = {"source": folder / "source.dcm"}
    dcmwrite(paths["source"], source, enforce_file_format=True)
    made = {"tagged": tag_original(source, result)}
    if result.classified:
        made["sc"] = gradcam_secondary_capture(
            source,
            overlay_for(source, result),
            result,
            series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
        )
    made["sr"] = result_report(
        [source], [result], series_instance_uid=generate_uid(), sop_instance_uid=generate_uid()
    )
    for kind, ds in made.items():
        paths[kind] = folder / f"{kind}.dcm"
        write_dataset(ds, paths[kind])
    return paths


def iod_name(lines: list[str]) -> str:
    """The IOD dciodvfy validated against: its first line that is no per-tag remark."""
    return next(line for line in lines if not line.startswith("("))


def check_outputs(paths: dict[str, Path]) -> None:
    reports = {kind: dciodvfy(path) for kind, path in paths.items()}
    assert iod_name(reports["tagged"]) == iod_name(reports["source"]), reports["tagged"]
    assert iod_name(reports["sr"]) == "EnhancedSR", reports["sr"]
    if "sc" in paths:
        assert iod_name(reports["sc"]) == "SCImage", reports["sc"]
    for kind in paths:
        assert not problems(reports[kind]), (kind, problems(reports[kind]))
        dumped = dcmdump(paths[kind])
        assert dumped.returncode == 0 and not dumped.stderr.strip(), (kind, dumped.stderr)
    # Tagging adds nothing to the report but the private elements dciodvfy cannot know.
    new_lines = [line for line in reports["tagged"] if line not in reports["source"]]
    assert all("(0x0011," in line and ACCEPTED_WARNINGS[0] in line for line in new_lines), new_lines


@pytest.fixture(autouse=True)
def quiet_openjpeg() -> None:
    # The JPEG 2000 encoder logs every tile at INFO.
    logging.getLogger("openjpeg").setLevel(logging.WARNING)


@pytest.mark.parametrize("variant", list(VARIANTS), ids=str)
def test_outputs_of_every_sample_variant_pass_dciodvfy(variant: str, tmp_path: Path) -> None:
    source = sample(variant)
    result = result_for(variant)
    paths = write_outputs(source, result, tmp_path / variant)
    check_outputs(paths)
    tagged = pydicom.dcmread(paths["tagged"])
    assert tagged.SOPInstanceUID == source.SOPInstanceUID
    assert tagged.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert tagged.PixelData == source.PixelData
    if "sc" in paths:
        sc = pydicom.dcmread(paths["sc"])
        assert sc.Rows > source.Rows
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


@pytest.mark.parametrize("charset", list(CHARACTER_SETS), ids=str)
def test_outputs_with_non_ascii_names_pass_dciodvfy(charset: str, tmp_path: Path) -> None:
    character_set, name = CHARACTER_SETS[charset]
    source = sample("plain")
    source.SpecificCharacterSet = character_set
    source.PatientName = name
    paths = write_outputs(source, result_for("plain"), tmp_path / charset)
    check_outputs(paths)
    for kind in ("tagged", "sc", "sr"):
        assert str(pydicom.dcmread(paths[kind]).PatientName) == name, kind


def test_report_of_a_study_with_several_instances_passes_dciodvfy(tmp_path: Path) -> None:
    first, second, rejected = sample("plain"), sample("jpeg2000"), sample("ct")
    for other in (second, rejected):
        other.StudyInstanceUID = first.StudyInstanceUID
        other.PatientID = first.PatientID
    report = result_report(
        [first, second, rejected],
        [result_for("plain"), result_for("jpeg2000"), result_for("ct")],
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
    )
    path = tmp_path / "sr.dcm"
    write_dataset(report, path)
    lines = dciodvfy(path)
    assert iod_name(lines) == "EnhancedSR"
    assert not problems(lines), problems(lines)
    assert dcmdump(path).returncode == 0
