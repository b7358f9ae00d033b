"""What the gateway writes back into a study: Grad-CAM captures, tagged originals, a report.

Three kinds of output, all pure functions of pydicom datasets and the pipeline's results
(no networking, no database; the pipeline writes what they return with `write_dataset`):

* `gradcam_secondary_capture`: one Secondary Capture per classified image (highdicom),
  in a new series of the same study, referencing its source.
* `tag_original`: a copy of a received instance with a private RADGATE block carrying
  the result. It keeps its SOP Instance UID, since downstream nodes receive it in place
  of the untagged original; its pixel data is never decoded.
* `result_report`: one Enhanced SR per study (highdicom) with a container per instance.

Private block: creator ``RADGATE`` in group 0x0011, elements (offsets in the block):

====  ====  ===========================================================  ===============
0x01  CS    predicted label, ``ABD`` or ``CHEST``                        classified only
0x02  DS    probability of that label                                    classified only
0x03  LO    model id                                                     classified only
0x04  LO    sha256 of the model weights                                  classified only
0x05  CS    gate result, ``PASSED`` or ``REJECTED``                      always
0x06  LT    gate rejection reasons, joined by ``"; "``                   rejected only
0x07  CS    BodyPartExamined names the other class, ``YES`` or ``NO``    classified only
====  ====  ===========================================================  ===============
"""

from __future__ import annotations

import copy
import io
import math
import numbers
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from inference.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

LABELS = ("abd", "chest")
PRIVATE_CREATOR = "RADGATE"
PRIVATE_GROUP = 0x0011
# Element offsets inside the RADGATE private block.
ELEMENT_LABEL = 0x01
ELEMENT_PROBABILITY = 0x02
ELEMENT_MODEL_ID = 0x03
ELEMENT_WEIGHTS_SHA256 = 0x04
ELEMENT_GATE_RESULT = 0x05
ELEMENT_REASONS = 0x06
ELEMENT_BODY_PART_MISMATCH = 0x07

GATE_PASSED = "PASSED"
GATE_REJECTED = "REJECTED"
REASON_SEPARATOR = "; "
MANUFACTURER = "radgate"
GRADCAM_SERIES_DESCRIPTION = "radgate Grad-CAM"
REPORT_SERIES_DESCRIPTION = "radgate result"

# Value limits of the VRs written here (PS3.5 table 6.2-1).
LO_MAX = 64
LT_MAX = 10240
_SHA256 = re.compile(r"[0-9a-f]{64}")
# LO: no backslash and no control characters (ESC excepted, unused here).
_LO_TEXT = re.compile(r"[\x20-\x5b\x5d-\x7e]+")

# Codes of this project's own concepts, for what no standard code says as precisely.
CODING_SCHEME = "99RADGATE"
CODING_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=CODING_SCHEME,
    name="radgate local codes",
    responsible_organization="radgate project",
)


def _local_code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning)


CODE_REPORT_TITLE = _local_code("RG001", "radgate result")
CODE_INSTANCE_RESULT = _local_code("RG002", "Instance result")
CODE_GATE_RESULT = _local_code("RG003", "Gate result")
CODE_GATE_PASSED = _local_code("RG004", "Passed")
CODE_GATE_REJECTED = _local_code("RG005", "Rejected")
CODE_REJECTION_REASON = _local_code("RG006", "Gate rejection reason")
CODE_PREDICTED_REGION = _local_code("RG007", "Predicted anatomic region")
CODE_PROBABILITY = _local_code("RG008", "Probability of predicted anatomic region")
CODE_WEIGHTS_SHA256 = _local_code("RG009", "Model weights SHA-256")
CODE_BODY_PART_MISMATCH = _local_code("RG010", "Body Part Examined contradicts prediction")
# The anatomic regions as CID 4031 codes them, as the radiographs' own anatomy does.
REGION_CODES = {"abd": codes.SCT.Abdomen, "chest": codes.SCT.Chest}
# The device that makes the report (TID 1004 Device Observer UID).
# generate_uid(entropy_srcs=["radgate device observer"]), fixed here like uids.py's.
DEVICE_OBSERVER_UID = UID("1.2.826.0.1.3680043.8.498.71854897404843931004441789936223989216")


@dataclass(frozen=True)
class InstanceResult:
    """What the pipeline knows about one original instance.

    Checked on construction, so that an inconsistent result fails where it is made.
    """

    gate_passed: bool
    reasons: tuple[str, ...]  # gate rejection reasons (empty when passed)
    label: str | None  # "abd" | "chest" | None (not classified)
    probability: float | None  # probability of `label`
    probabilities: dict[str, float] | None
    model_id: str | None
    weights_sha256: str | None
    body_part_mismatch: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.reasons, str):
            raise ValueError(f"reasons must be a tuple of texts, not the text {self.reasons!r}")
        if self.gate_passed and self.reasons:
            raise ValueError(f"result passed the gate but has reasons {list(self.reasons)}")
        if not self.gate_passed:
            if not self.reasons:
                raise ValueError("result rejected by the gate has no reasons")
            if self.label is not None:
                raise ValueError(f"result rejected by the gate has label {self.label!r}")
        for reason in self.reasons:
            if not isinstance(reason, str) or not reason.strip():
                raise ValueError(f"reasons: {reason!r} is not a non-empty text")
        if self.probabilities is not None:
            for name, value in self.probabilities.items():
                if name not in LABELS:
                    raise ValueError(f"probabilities: label {name!r} not one of {LABELS}")
                _check_probability(value, f"probabilities[{name!r}]")
        if self.label is None:
            if self.body_part_mismatch:
                raise ValueError("body_part_mismatch is set on a result without a label")
            return
        if self.label not in LABELS:
            raise ValueError(f"label {self.label!r} not one of {LABELS}")
        if self.probability is None:
            raise ValueError(f"label {self.label!r} has no probability")
        _check_probability(self.probability, "probability")
        if not self.model_id or not _LO_TEXT.fullmatch(self.model_id):
            raise ValueError(
                f"model_id {self.model_id!r} is not printable ASCII without backslashes"
            )
        if len(self.model_id) > LO_MAX:
            raise ValueError(f"model_id {self.model_id!r} is longer than {LO_MAX} characters")
        if self.weights_sha256 is None or not _SHA256.fullmatch(self.weights_sha256):
            raise ValueError(
                f"weights_sha256 {self.weights_sha256!r} is not 64 lower-case hex digits"
            )

    @property
    def classified(self) -> bool:
        return self.label is not None


def _check_probability(value: float, name: str) -> None:
    # numbers.Real takes numpy's floats too: probabilities often come straight from torch.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} {value!r} is not a number")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} {value!r} not in [0, 1]")


def _classified_fields(result: InstanceResult) -> tuple[str, float, str, str]:
    """label, probability, model id, sha256 of a classified result (checked on construction)."""
    if (
        result.label is None
        or result.probability is None
        or result.model_id is None
        or result.weights_sha256 is None
    ):
        raise ValueError("result has no label: the image was not classified")
    return result.label, float(result.probability), result.model_id, result.weights_sha256


def _ds_text(value: float) -> DSfloat:
    """A DS value of at most 16 characters, as precise as that allows."""
    return DSfloat(value, auto_format=True)


def _ascii(text: str) -> str:
    """Text that every character set a source may declare can carry.

    Reasons come from the gate and quote attribute values; the database keeps their
    exact text, the DICOM copy replaces what plain ASCII cannot hold.
    """
    return text.encode("ascii", "replace").decode("ascii")


def _require(source: Dataset, keyword: str, name: str = "source") -> str:
    value = source.get(keyword)
    if value is None or str(value).strip() == "":
        raise ValueError(f"{name} has no {keyword}")
    return str(value)


def _check_new_uid(value: str, argument: str, used: dict[str, str]) -> UID:
    uid = UID(value)
    if not uid.is_valid:
        raise ValueError(f"{argument} {value!r} is not a valid UID")
    for keyword, existing in used.items():
        if uid == existing:
            raise ValueError(f"{argument} {value!r} equals the source's {keyword}")
    return uid


def _add_result_block(ds: Dataset, result: InstanceResult) -> None:
    """Write the RADGATE private block into `ds`, replacing any earlier one."""
    try:
        existing = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        existing = None
    if existing is not None:
        # A study processed again: no element of an earlier result may survive.
        for offset in range(0x100):
            tag = existing.get_tag(offset)
            if tag in ds:
                del ds[tag]
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    if result.classified:
        label, probability, model_id, weights_sha256 = _classified_fields(result)
        block.add_new(ELEMENT_LABEL, "CS", label.upper())
        block.add_new(ELEMENT_PROBABILITY, "DS", _ds_text(probability))
        block.add_new(ELEMENT_MODEL_ID, "LO", model_id)
        block.add_new(ELEMENT_WEIGHTS_SHA256, "LO", weights_sha256)
    block.add_new(ELEMENT_GATE_RESULT, "CS", GATE_PASSED if result.gate_passed else GATE_REJECTED)
    if not result.gate_passed:
        reasons = _ascii(REASON_SEPARATOR.join(result.reasons))
        if len(reasons) > LT_MAX:
            raise ValueError(f"reasons are {len(reasons)} characters, LT holds {LT_MAX}")
        block.add_new(ELEMENT_REASONS, "LT", reasons)
    if result.classified:
        block.add_new(
            ELEMENT_BODY_PART_MISMATCH, "CS", "YES" if result.body_part_mismatch else "NO"
        )


def _radgate_file_meta(ds: Dataset, transfer_syntax: UID) -> FileMetaDataset:
    """File meta of a file that radgate writes: it names radgate as the writer."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


# --------------------------------------------------------------------------- Grad-CAM SC

# Patient- and study-level attributes that `SCImage.from_ref_dataset` does not copy and
# that a viewer shows with the study; copied as they are when the source has them.
_EXTRA_CONTEXT = (
    "IssuerOfPatientID",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "StudyDescription",
)
# Once lossy compressed, a picture and everything derived from it stays lossy (PS3.3
# C.7.6.1.1.5): the overlay is drawn from the decoded, possibly lossy, source pixels.
_LOSSY_ATTRIBUTES = (
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)


def gradcam_secondary_capture(
    source: Dataset,
    overlay_rgb: np.ndarray,
    result: InstanceResult,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
) -> Dataset:
    """A Secondary Capture of the Grad-CAM overlay of `source`, in a new series of its study.

    `overlay_rgb` is uint8 (H, W, 3): the image at the source's size, possibly with a
    legend strip below it (so H may exceed the source's Rows). The legend's text is part
    of the pixels, hence BurnedInAnnotation YES.
    """
    _require(source, "StudyInstanceUID")
    source_class = _require(source, "SOPClassUID")
    source_instance = _require(source, "SOPInstanceUID")
    label, probability, model_id, weights_sha256 = _classified_fields(result)
    overlay = np.asarray(overlay_rgb)
    if overlay.dtype != np.uint8 or overlay.ndim != 3 or overlay.shape[2] != 3:
        raise ValueError(
            f"overlay_rgb must be uint8 (H, W, 3), got {overlay.dtype} {overlay.shape}"
        )
    if overlay.shape[0] == 0 or overlay.shape[1] == 0:
        raise ValueError(f"overlay_rgb is empty: {overlay.shape}")
    rows, columns = source.get("Rows"), source.get("Columns")
    if columns is not None and overlay.shape[1] != columns:
        raise ValueError(
            f"overlay_rgb is {overlay.shape[1]} pixels wide, the source's Columns is {columns}"
        )
    if rows is not None and overlay.shape[0] < rows:
        raise ValueError(
            f"overlay_rgb is {overlay.shape[0]} pixels high, less than the source's Rows {rows}"
        )
    used = {
        "SeriesInstanceUID": str(source.get("SeriesInstanceUID", "")),
        "SOPInstanceUID": source_instance,
    }
    series_uid = _check_new_uid(series_instance_uid, "series_instance_uid", used)
    instance_uid = _check_new_uid(sop_instance_uid, "sop_instance_uid", used)

    orientation = _patient_orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(overlay),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # highdicom requires an orientation for a patient image; a source without one
        # gets an empty PatientOrientation (type 2C) below rather than an invented one.
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=GRADCAM_SERIES_DESCRIPTION,
        manufacturer_model_name="radgate gateway",
        software_versions=IMPLEMENTATION_VERSION_NAME,
        specific_character_set=_highdicom_character_set(source),
    )
    _keep_character_set(source, sc)
    if orientation is None:
        sc["PatientOrientation"] = DataElement(Tag("PatientOrientation"), "CS", None)
    for keyword in _EXTRA_CONTEXT:
        if keyword in source and keyword not in sc:
            sc[keyword] = copy.deepcopy(source[keyword])
    _copy_anatomy(source, sc)

    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = hd.sc.ConversionTypeValues.WSD.value
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = "radgate gateway"
    sc.SecondaryCaptureDeviceSoftwareVersions = IMPLEMENTATION_VERSION_NAME
    sc.BurnedInAnnotation = "YES"
    description = (
        f"Grad-CAM heat map of model {model_id} (weights sha256 {weights_sha256[:12]}) "
        f"for label {label.upper()}, probability {probability:.3f}; "
        "legend burned in below the image"
    )
    sc.DerivationDescription = description
    sc.SourceImageSequence = DicomSequence([_source_reference(source_class, source_instance)])
    if source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"
        for keyword in _LOSSY_ATTRIBUTES:
            if keyword in source:
                sc[keyword] = copy.deepcopy(source[keyword])
    else:
        sc.LossyImageCompression = "00"
    _add_result_block(sc, result)
    sc.file_meta = _radgate_file_meta(sc, ExplicitVRLittleEndian)
    return sc


def _highdicom_character_set(source: Dataset) -> str | list[str] | None:
    """The source's SpecificCharacterSet in the spelling highdicom accepts.

    An empty first value of a multi-valued set means ISO 2022 IR 6 (PS3.3 C.12.1.1.2),
    which highdicom only takes spelled out.
    """
    value = source.get("SpecificCharacterSet")
    if value is None or isinstance(value, str):
        return value or None
    values = [str(term) for term in value]
    if len(values) > 1 and not values[0]:
        values[0] = "ISO 2022 IR 6"
    return values


def _keep_character_set(source: Dataset, output: Dataset) -> None:
    """Give `output` the source's SpecificCharacterSet value exactly as the source has it."""
    if "SpecificCharacterSet" in source:
        output.SpecificCharacterSet = copy.deepcopy(source.SpecificCharacterSet)


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's PatientOrientation when highdicom accepts it as a biped's, else None."""
    value = source.get("PatientOrientation")
    if not value or isinstance(value, str) or len(value) != 2:
        return None
    row, column = str(value[0]), str(value[1])
    try:
        hd.PatientOrientationValuesBiped(row)
        hd.PatientOrientationValuesBiped(column)
    except ValueError:
        return None
    return row, column


def _copy_anatomy(source: Dataset, sc: Dataset) -> None:
    """BodyPartExamined and Laterality (General Series) of the anatomy the SC shows.

    Laterality is type 2C: due for a paired or unknown body part. Without a body part
    it says "unknown" (empty) rather than leaving a validator to assume a paired one.
    """
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    laterality = source.get("Laterality") or source.get("ImageLaterality")
    if laterality in ("R", "L"):
        sc.Laterality = laterality
    elif "Laterality" in source or not source.get("BodyPartExamined"):
        sc.Laterality = None


def _source_reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    purpose = Dataset()
    purpose.CodeValue = codes.DCM.SourceImageForImageProcessingOperation.value
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = codes.DCM.SourceImageForImageProcessingOperation.meaning
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


# ---------------------------------------------------------------------- tagged originals


def tag_original(source: Dataset, result: InstanceResult) -> Dataset:
    """A copy of `source` with the RADGATE private block; `source` itself is not changed.

    Same SOP Instance UID (downstream nodes receive it in place of the untagged
    instance), same transfer syntax and pixel data bytes, file meta naming radgate
    as the writer.
    """
    _require(source, "SOPClassUID")
    _require(source, "SOPInstanceUID")
    transfer_syntax = _output_syntax(source)
    tagged = copy.deepcopy(source)
    # pydicom 3.0's deepcopy keeps cached private blocks bound to the original dataset
    # (pydicom issue #2294): a block looked up on the copy would write into `source`.
    tagged._private_blocks = {}
    _add_result_block(tagged, result)
    meta = _radgate_file_meta(tagged, transfer_syntax)
    source_meta = getattr(source, "file_meta", None)
    if source_meta is not None and source_meta.get("SourceApplicationEntityTitle"):
        # Still the AE that made the content: radgate only adds the private block.
        meta.SourceApplicationEntityTitle = source_meta.SourceApplicationEntityTitle
    tagged.file_meta = meta
    return tagged


def _output_syntax(ds: Dataset) -> UID:
    """How radgate writes `ds`: compressed as it is, anything else explicit VR little endian.

    Big endian is refused: pydicom does not byte-swap pixel data when converting it.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        pixel_data = ds.data_element("PixelData")
        if pixel_data is not None and pixel_data.is_undefined_length:
            raise ValueError(
                "dataset has no file meta TransferSyntaxUID and its pixel data is encapsulated"
            )
        if ds.original_encoding[1] is False:
            raise ValueError("dataset was read as big endian: cannot rewrite it")
        return ExplicitVRLittleEndian
    syntax = UID(syntax)
    if syntax.is_encapsulated:
        return syntax
    if not syntax.is_little_endian:
        raise ValueError(f"TransferSyntaxUID {syntax.name} is big endian: cannot rewrite it")
    return ExplicitVRLittleEndian


# ---------------------------------------------------------------------------------- SR


def result_report(
    sources: Sequence[Dataset],
    results: Sequence[InstanceResult],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9902,
) -> Dataset:
    """An Enhanced SR of the study's result: one container per source instance, in order.

    Each container holds the referenced image, the gate result and its reasons, and for a
    classified image the predicted anatomic region, its probability (UCUM "1"), the
    algorithm identification (TID 4019: name = model id, version = sha256[:12]), the full
    weights sha256 and whether BodyPartExamined contradicts the prediction.
    """
    if not sources:
        raise ValueError("sources is empty: a report needs at least one instance")
    if len(sources) != len(results):
        raise ValueError(f"{len(sources)} sources but {len(results)} results")
    study_uid = _require(sources[0], "StudyInstanceUID", "source 1")
    patient_id = str(sources[0].get("PatientID", ""))
    seen: set[str] = set()
    used: dict[str, str] = {}
    for number, source in enumerate(sources, start=1):
        name = f"source {number}"
        if _require(source, "StudyInstanceUID", name) != study_uid:
            raise ValueError(
                f"{name} StudyInstanceUID {source.StudyInstanceUID} is not {study_uid}"
            )
        if str(source.get("PatientID", "")) != patient_id:
            raise ValueError(f"{name} PatientID {source.get('PatientID')!r} is not {patient_id!r}")
        _require(source, "SOPClassUID", name)
        instance = _require(source, "SOPInstanceUID", name)
        _require(source, "SeriesInstanceUID", name)
        if instance in seen:
            raise ValueError(f"{name} SOPInstanceUID {instance} appears twice")
        seen.add(instance)
        used[f"SeriesInstanceUID of {name}"] = str(source.SeriesInstanceUID)
        used[f"SOPInstanceUID of {name}"] = instance
    series_uid = _check_new_uid(series_instance_uid, "series_instance_uid", used)
    instance_uid = _check_new_uid(sop_instance_uid, "sop_instance_uid", used)

    root = hd.sr.ContainerContentItem(name=CODE_REPORT_TITLE, is_content_continuous=False)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID,
            name="radgate",
            manufacturer_name=MANUFACTURER,
            model_name="radgate gateway",
        ),
    )
    children = hd.sr.ContentSequence(is_root=False)
    children.extend(hd.sr.ObservationContext(observer_device_context=observer))
    children.extend(
        _instance_container(source, result) for source, result in zip(sources, results, strict=True)
    )
    root.ContentSequence = children
    evidence = [_header(source) for source in sources]
    _fill_type2(evidence[0])
    report = hd.sr.EnhancedSR(
        evidence=evidence,
        content=root,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        # Complete: every instance of the study has its container. Not final and not
        # verified: no person has reviewed a machine result.
        is_complete=True,
        series_description=REPORT_SERIES_DESCRIPTION,
        manufacturer_model_name="radgate gateway",
        software_versions=IMPLEMENTATION_VERSION_NAME,
        coding_schemes=[CODING_SCHEME_ITEM],
        specific_character_set=_highdicom_character_set(evidence[0]),
    )
    _keep_character_set(evidence[0], report)
    report.file_meta = _radgate_file_meta(report, ExplicitVRLittleEndian)
    return report


def _header(source: Dataset) -> Dataset:
    """`source` without its pixel data: the report copies context, never pixels."""
    header = Dataset()
    for element in source:
        if element.tag < 0x7FE00000:
            header.add(element)
    return header


# Type 2 attributes that highdicom's SR reads from the first source unconditionally.
_SR_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def _fill_type2(header: Dataset) -> None:
    for keyword in _SR_TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)


def _instance_container(source: Dataset, result: InstanceResult) -> hd.sr.ContainerContentItem:
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    container = hd.sr.ContainerContentItem(
        name=CODE_INSTANCE_RESULT, is_content_continuous=False, relationship_type=contains
    )
    items = hd.sr.ContentSequence(is_root=False)
    if result.classified:
        # Concept modifiers first: the algorithm that produced the rest of the container.
        _, _, model_id, weights_sha256 = _classified_fields(result)
        items.extend(hd.sr.AlgorithmIdentification(name=model_id, version=weights_sha256[:12]))
    if "PixelData" in source:
        items.append(
            hd.sr.ImageContentItem(
                name=codes.DCM.SourceImageForImageProcessingOperation,
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
                relationship_type=contains,
            )
        )
    else:
        items.append(
            hd.sr.CompositeContentItem(
                name=codes.SCT.Source,
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
                relationship_type=contains,
            )
        )
    items.append(
        hd.sr.CodeContentItem(
            name=CODE_GATE_RESULT,
            value=CODE_GATE_PASSED if result.gate_passed else CODE_GATE_REJECTED,
            relationship_type=contains,
        )
    )
    items.extend(
        hd.sr.TextContentItem(
            name=CODE_REJECTION_REASON, value=_ascii(reason), relationship_type=contains
        )
        for reason in result.reasons
    )
    if result.classified:
        label, probability, _, weights_sha256 = _classified_fields(result)
        items.extend(
            [
                hd.sr.CodeContentItem(
                    name=CODE_PREDICTED_REGION,
                    value=REGION_CODES[label],
                    relationship_type=contains,
                ),
                hd.sr.NumContentItem(
                    name=CODE_PROBABILITY,
                    value=probability,
                    unit=codes.UCUM.NoUnits,
                    relationship_type=contains,
                ),
                hd.sr.TextContentItem(
                    name=CODE_WEIGHTS_SHA256, value=weights_sha256, relationship_type=contains
                ),
                hd.sr.CodeContentItem(
                    name=CODE_BODY_PART_MISMATCH,
                    value=codes.SCT.Yes if result.body_part_mismatch else codes.SCT.No,
                    relationship_type=contains,
                ),
            ]
        )
    container.ContentSequence = items
    return container


# --------------------------------------------------------------------------------- write


def _as_file(ds: Dataset) -> Dataset:
    """`ds` with radgate's file meta: its own syntax when encapsulated, else explicit VR LE."""
    syntax = _output_syntax(ds)
    meta = FileMetaDataset()
    if hasattr(ds, "file_meta"):
        meta.update(copy.deepcopy(ds.file_meta))
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = UID(_require(ds, "SOPClassUID", "dataset"))
    meta.MediaStorageSOPInstanceUID = UID(_require(ds, "SOPInstanceUID", "dataset"))
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    # A shallow copy shares the elements but not the file meta: `ds` keeps its own.
    out = copy.copy(ds)
    out.file_meta = meta
    out.preamble = b"\x00" * 128
    return out


def encode_dataset(ds: Dataset) -> bytes:
    """`ds` as the bytes of a DICOM file, as `write_dataset` would write it (for the spool)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, _as_file(ds), enforce_file_format=True)
    return buffer.getvalue()


def write_dataset(ds: Dataset, path: Path) -> None:
    """Write `ds` as a DICOM file at `path`: a temporary file, fsync, atomic rename.

    Encapsulated (compressed) datasets keep their transfer syntax and pixel bytes; all
    others are written as explicit VR little endian. `ds` is not changed. The folder
    must exist; it is fsynced after the rename so that the new name is durable too.
    """
    out = _as_file(ds)
    path = Path(path)
    temporary: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as handle:
            temporary = Path(handle.name)
            dcmwrite(handle, out, enforce_file_format=True)
            handle.flush()
            os.fsync(handle.fileno())
        # NamedTemporaryFile creates 0600: DICOM peers and tools read these files.
        temporary.chmod(0o644)
        os.replace(temporary, path)
        temporary = None
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
