"""The gate's decisions and the reasons it records."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from gateway.config import GateConfig
from gateway.gate import body_part_mismatch, evaluate, metadata_reasons
from inference.errors import MultiFrame, UndecodablePixels


def _ds(**values: object) -> Dataset:
    ds = Dataset()
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.PixelData = b"\0" * 16
    for key, value in values.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("values", "reasons"),
    [
        ({}, []),
        ({"Modality": "CR", "BodyPartExamined": "abdomen"}, []),
        ({"Modality": "CT"}, ["modality CT not in [CR, DX]"]),
        ({"Modality": None}, ["modality missing (expected one of [CR, DX])"]),
        ({"BodyPartExamined": "ELBOW"}, ["body part ELBOW not allowed"]),
        ({"BodyPartExamined": None}, []),
        ({"NumberOfFrames": 3}, ["multi-frame"]),
        ({"PixelData": None}, ["no pixel data"]),
        (
            {"Modality": "MR", "BodyPartExamined": "HAND"},
            ["modality MR not in [CR, DX]", "body part HAND not allowed"],
        ),
    ],
)
def test_metadata_reasons(values: dict, reasons: list[str]) -> None:
    assert metadata_reasons(_ds(**values), GateConfig()) == reasons


def test_missing_body_part_can_be_refused() -> None:
    gate = GateConfig(allow_missing_body_part=False)
    assert metadata_reasons(_ds(BodyPartExamined=None), gate) == ["body part missing"]


def test_pixels_are_only_decoded_when_the_metadata_passes() -> None:
    calls = []

    def prepare(ds: Dataset) -> str:
        calls.append(ds)
        return "tensor"

    rejected = evaluate(_ds(Modality="CT"), GateConfig(), prepare)
    assert (rejected.passed, rejected.reasons, calls) == (
        False,
        ("modality CT not in [CR, DX]",),
        [],
    )
    passed = evaluate(_ds(), GateConfig(), prepare)
    assert (passed.passed, passed.reasons, passed.prepared) == (True, (), "tensor")


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (MultiFrame(2), "multi-frame"),
        (UndecodablePixels("bad JPEG 2000"), "pixel data does not decode"),
    ],
)
def test_decode_failures_become_reasons(error: Exception, reason: str) -> None:
    def prepare(ds: Dataset) -> None:
        raise error

    result = evaluate(_ds(), GateConfig(), prepare)
    assert not result.passed and result.reasons == (reason,)


def test_body_part_mismatch() -> None:
    assert body_part_mismatch(_ds(BodyPartExamined="CHEST"), "abd")
    assert not body_part_mismatch(_ds(BodyPartExamined="CHEST"), "chest")
    assert body_part_mismatch(_ds(BodyPartExamined="ABDOMEN"), "chest")
    assert not body_part_mismatch(_ds(BodyPartExamined=None), "chest")
