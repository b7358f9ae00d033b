"""Fuzzing the gate and the preprocessing with what a sender can put in a file.

Whatever bytes get stored, `read_and_gate` (what the pipeline runs on each instance
before inference) must answer with a `GateResult`: passed with a model input of the
right shape, or rejected with at least one reason. An exception would fail the whole
study instead of rejecting one image. The number of examples is bounded so the run
stays well under a minute on two cores.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from gateway.config import GateConfig
from gateway.gate import GateResult
from gateway.pipeline import read_and_gate
from inference.preprocess import PreprocessSpec

# A small network input keeps each example cheap; the code paths are the same.
SPEC = PreprocessSpec(resize=48, size=32)
GATE = GateConfig()
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
# Fixed UIDs: an example must encode to the same bytes each time hypothesis replays it.
SOP_INSTANCE_UID = "1.2.826.0.1.3680043.10.1455.99.1"
STUDY_UID = "1.2.826.0.1.3680043.10.1455.99.2"
FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)

NATIVE_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
CHARACTER_SETS = [None, "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87", "ISO_IR 999"]
NAMES = ["TEST^PATIENT", "Müller^Jörg", "山田^太郎", "Ωμέγα^Άλφα"]


def _assert_defined(result: GateResult) -> None:
    assert isinstance(result, GateResult)
    event("passed" if result.passed else f"rejected: {result.reasons[0][:24]}")
    if result.passed:
        assert result.reasons == ()
        tensor = result.prepared.tensor
        assert isinstance(tensor, torch.Tensor)
        assert tuple(tensor.shape) == (3, SPEC.size, SPEC.size)
        assert bool(torch.isfinite(tensor).all())
    else:
        assert result.reasons and all(isinstance(r, str) and r for r in result.reasons)


# Odd values per attribute; `None` removes the attribute.
ODD_VALUES: dict[str, list[object]] = {
    "Modality": ["CT", None, "dx ", ""],
    "BodyPartExamined": ["ELBOW", ""],
    "Rows": [0, 1, 65535, 4097, None],
    "Columns": [0, 1, 65535, 4097, None],
    "PhotometricInterpretation": ["PALETTE COLOR", "YBR_FULL", "", None],
    "SamplesPerPixel": [0, 3, 4, None],
    "BitsAllocated": [1, 12, 32, 0, None],
    "BitsStored": [0, 17, 40],
    "PixelRepresentation": [2, None],
    "NumberOfFrames": ["2", "0", "1"],
}


@st.composite
def datasets(draw: st.DrawFn) -> tuple[Dataset, str]:
    """A valid radiograph header with up to two attributes made odd, and odd extras."""
    ds = Dataset()
    charset = draw(st.sampled_from(CHARACTER_SETS))
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = SOP_INSTANCE_UID
    ds.StudyInstanceUID = STUDY_UID
    ds.PatientName = draw(st.sampled_from(NAMES))
    photometric = draw(st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB"]))
    bits_allocated = draw(st.sampled_from([8, 16]))
    values: dict[str, Any] = {
        "Modality": draw(st.sampled_from(["DX", "CR"])),
        "BodyPartExamined": draw(st.sampled_from([None, "CHEST", "ABDOMEN"])),
        "Rows": draw(st.integers(32, 72)),
        "Columns": draw(st.integers(32, 72)),
        "PhotometricInterpretation": photometric,
        "SamplesPerPixel": 3 if photometric == "RGB" else 1,
        "BitsAllocated": bits_allocated,
        "BitsStored": draw(st.integers(1, bits_allocated)),
        "PixelRepresentation": draw(st.sampled_from([0, 1])),
        "NumberOfFrames": None,
    }
    for keyword in draw(st.lists(st.sampled_from(sorted(ODD_VALUES)), max_size=2, unique=True)):
        values[keyword] = draw(st.sampled_from(ODD_VALUES[keyword]))
    for keyword, value in values.items():
        if value is not None:
            setattr(ds, keyword, value)
    if "BitsStored" in ds:
        ds.HighBit = max(0, int(ds.BitsStored) - 1)
    if values["SamplesPerPixel"] == 3:
        ds.PlanarConfiguration = draw(st.sampled_from([0, 1]))
    rows = int(values["Rows"] or 0)
    columns = int(values["Columns"] or 0)
    samples = int(values["SamplesPerPixel"] or 1)
    bits_allocated = int(values["BitsAllocated"] or 8)
    if draw(st.booleans()):
        ds.WindowCenter = draw(st.floats(-5000, 5000, allow_nan=False))
        ds.WindowWidth = draw(st.floats(-10, 10000, allow_nan=False))
    if draw(st.booleans()):
        ds.RescaleSlope = draw(st.sampled_from([1, 0, -1, 0.5, 1e6]))
        ds.RescaleIntercept = draw(st.sampled_from([0, -1024, 1e9]))
    if draw(st.booleans()):
        # A private block the gateway has never heard of, and a nested sequence.
        block = ds.private_block(0x0029, "SOMEVENDOR 1.0", create=True)
        block.add_new(0x10, "OB", draw(st.binary(max_size=64)))
        inner = Dataset()
        inner.CodeValue = "X"
        ds.add_new(0x00081110, "SQ", [inner])

    compressed = draw(st.booleans()) and draw(st.booleans())
    if compressed:
        syntax = draw(st.sampled_from([JPEG2000, RLELossless]))
        ds.PixelData = encapsulate([draw(st.binary(min_size=2, max_size=256))])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        return ds, syntax
    syntax = draw(st.sampled_from(NATIVE_SYNTAXES))
    declared = rows * columns * max(samples, 1) * max(bits_allocated, 8) // 8
    # Cap what is really written: a 65535 x 65535 header comes with little data.
    length = draw(
        st.sampled_from(["exact", "exact", "short", "none", "odd"]).map(
            lambda kind: {
                "exact": min(declared, 64 * 64 * 8),
                "short": min(declared, 64 * 64 * 8) // 2,
                "none": -1,
                "odd": min(declared, 64 * 64 * 8) + 1,
            }[kind]
        )
    )
    if length >= 0:
        seed = draw(st.integers(0, 2**16))
        data = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
        ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
        ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    return ds, syntax


def _encode(ds: Dataset, syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(DX_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    meta.TransferSyntaxUID = UID(syntax)
    ds.file_meta = meta
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@FUZZ_SETTINGS
@given(case=datasets())
def test_any_header_gets_a_gate_result(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[Dataset, str]
) -> None:
    ds, syntax = case
    path = Path(tmp_path_factory.mktemp("fuzz")) / "instance.dcm"
    try:
        path.write_bytes(_encode(ds, syntax))
    except (ValueError, OverflowError, TypeError):
        # pydicom refuses to encode some combinations (e.g. a value too large for
        # its VR): nothing a sender could deliver either.
        return
    _dataset, result = read_and_gate(path, GATE, SPEC)
    _assert_defined(result)


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    """A valid small radiograph file, then truncated and with bytes overwritten."""
    ds = Dataset()
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = SOP_INSTANCE_UID
    ds.StudyInstanceUID = STUDY_UID
    ds.SpecificCharacterSet = draw(st.sampled_from(["ISO_IR 100", "ISO_IR 192"]))
    ds.PatientName = draw(st.sampled_from(NAMES[:2]))
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.Rows = ds.Columns = 40
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.arange(1600, dtype=np.uint16).tobytes()
    syntax = draw(st.sampled_from(NATIVE_SYNTAXES))
    data = bytearray(_encode(ds, syntax))
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(128, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@FUZZ_SETTINGS
@given(data=damaged_files())
def test_any_damaged_file_gets_a_gate_result(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "damaged.dcm"
    path.write_bytes(data)
    _dataset, result = read_and_gate(path, GATE, SPEC)
    _assert_defined(result)


def test_a_file_cut_inside_its_file_meta_is_a_rejection(tmp_path: Path) -> None:
    # Found by the fuzz test above: pydicom raised BytesLengthException (not one of the
    # errors the pipeline caught), which failed the whole study instead of one image.
    path = tmp_path / "cut.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\xb0")
    dataset, result = read_and_gate(path, GATE, SPEC)
    assert dataset is None
    assert (result.passed, result.reasons) == (False, ("pixel data does not decode",))
