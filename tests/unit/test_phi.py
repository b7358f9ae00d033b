"""Patient values are found in data sets (even undecodable ones) and redacted from texts."""

from __future__ import annotations

from io import BytesIO

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from gateway.phi import REDACTED, identifying_values, patient_values, redact


def _as_read(dataset: Dataset) -> Dataset:
    """`dataset` encoded and read back: elements stay raw until accessed."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, dataset)
    return read_dataset(BytesIO(buffer.getvalue()), is_implicit_VR=False, is_little_endian=True)


def test_values_are_found_whole_and_by_component_even_when_they_do_not_decode() -> None:
    source = Dataset()
    source.PatientName = "Zzyzx^Quartermaine^J"
    source.PatientID = "PHI-TEST-123456"
    source.OtherPatientIDs = ["OTHER-1", "OTHER-2"]
    with config.disable_value_validation():
        source.PatientBirthDate = "not-a-date"  # a DA pydicom cannot convert
    source.StudyDescription = "CHEST PA"  # not identifying
    values = patient_values([_as_read(source)])
    assert values[0] == "Zzyzx^Quartermaine^J"  # longest first
    assert {"Zzyzx", "Quartermaine", "PHI-TEST-123456", "OTHER-1", "OTHER-2"} <= set(values)
    assert "not-a-date" in values
    assert "J" not in values  # initials identify nobody
    assert not any("CHEST" in value for value in values)


def test_redact_replaces_every_value() -> None:
    values = identifying_values(["Zzyzx^Quartermaine", "PHI-TEST-123456", None, ""])
    text = "Unable to convert 'PHI-TEST-123456' for 'Zzyzx^Quartermaine' (Quartermaine) to 'DA'"
    assert redact(text, values) == (
        f"Unable to convert '{REDACTED}' for '{REDACTED}' ({REDACTED}) to 'DA'"
    )
    assert redact("nothing to hide", values) == "nothing to hide"
