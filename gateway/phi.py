"""Keeping patient data out of log lines and error texts.

radgate's own messages name instances by UID, never by patient. But the libraries it
calls quote the values they refuse: highdicom and pydicom raise
``Unable to convert 'JOHN^DOE' to 'DA' object`` for a malformed attribute. `redact`
replaces the patient's identifying values in such a text before it is logged or
recorded; the values are read raw from the data sets, so a value that does not even
decode is still found.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

# Patient-identifying attributes of the Patient module (PS3.3 C.7.1.1) and the study's
# accession number: what an error text must not carry.
PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "AccessionNumber",
)
# Name components shorter than this (initials, "MR") are left: they identify nobody
# and would blank out ordinary words.
MIN_REDACTED_LENGTH = 3
REDACTED = "<redacted>"


def _raw_text(dataset: Dataset, keyword: str) -> str | None:
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in dataset:
        return None
    try:
        element = dataset.get_item(tag)
    except Exception:
        return None
    if element is None:
        return None
    value = element.value
    if isinstance(element, RawDataElement) or isinstance(value, bytes):
        if not isinstance(value, bytes):
            return None
        return value.decode("latin-1").strip("\0 ")
    return str(value).strip()


def patient_values(datasets: Iterable[Dataset]) -> list[str]:
    """The identifying values in `datasets`, see `identifying_values`."""
    return identifying_values(
        _raw_text(dataset, keyword) for dataset in datasets for keyword in PATIENT_KEYWORDS
    )


def identifying_values(texts: Iterable[str | None]) -> list[str]:
    """`texts` whole and split into their values and name components, longest first (so
    that a whole name is replaced before its parts)."""
    values: set[str] = set()
    for text in texts:
        if not text:
            continue
        values.add(text)
        for separator in ("\\", "=", "^"):
            text = text.replace(separator, "\n")
        values.update(part.strip() for part in text.splitlines())
    return sorted((v for v in values if len(v) >= MIN_REDACTED_LENGTH), key=len, reverse=True)


def redact(text: str, values: Iterable[str]) -> str:
    """`text` with every value of `values` replaced by ``<redacted>``."""
    for value in values:
        text = text.replace(value, REDACTED)
    return text
