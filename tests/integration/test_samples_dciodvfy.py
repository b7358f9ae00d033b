"""Every object `radgate samples` writes passes dicom3tools' IOD validator, dciodvfy."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main

# The IOD name dciodvfy prints first, per SOP class: it must validate what we meant.
IOD_NAMES = {
    "1.2.840.10008.5.1.4.1.1.1": "CRImage",
    "1.2.840.10008.5.1.4.1.1.1.1": "DXImageForPresentation",
    "1.2.840.10008.5.1.4.1.1.2": "CTImage",
}
# The one warning the samples accept: a CR whose body part is unknown (type 2, empty)
# must carry Laterality (type 2C), which can then only be empty too.
ACCEPTED_WARNINGS = ("is only permitted to be empty when actually unknown",)


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's report (it writes to stderr), one line per entry."""
    executable = shutil.which("dciodvfy")
    assert executable, "dciodvfy (Debian package dicom3tools, `make system-deps`) is required"
    result = subprocess.run(
        [executable, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]


def generate(data: Path, out: Path, *options: str) -> list[dict[str, Any]]:
    assert main(["samples", "--data", str(data), "--out", str(out), *options]) == 0
    manifest: list[dict[str, Any]] = json.loads((out / "manifest.json").read_text())
    return manifest


@pytest.mark.parametrize("options", [("--variants",), ("--split", "all")], ids=str)
def test_every_sample_passes_dciodvfy(
    options: tuple[str, ...], sample_data_dir: Path, tmp_path: Path
) -> None:
    manifest = generate(sample_data_dir, tmp_path, *options)
    assert manifest
    reports = {entry["path"]: dciodvfy(tmp_path / entry["path"]) for entry in manifest}
    errors = {
        path: [line for line in lines if line.startswith("Error")]
        for path, lines in reports.items()
    }
    assert not {path: lines for path, lines in errors.items() if lines}
    for entry in manifest:
        lines = reports[entry["path"]]
        assert lines and lines[0] == IOD_NAMES[entry["sop_class_uid"]], lines
        warnings = [line for line in lines if line.startswith("Warning")]
        unexpected = [w for w in warnings if not any(a in w for a in ACCEPTED_WARNINGS)]
        assert not unexpected, (entry["path"], unexpected)
