"""gateway.outputs: the Grad-CAM SC, tagged originals and the result SR, read back from disk."""

from __future__ import annotations

import copy
import logging
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForPresentation,
    EnhancedSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from gateway import outputs
from gateway.outputs import (
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    InstanceResult,
    gradcam_secondary_capture,
    result_report,
    tag_original,
    write_dataset,
)
from inference.uids import IMPLEMENTATION_CLASS_UID

SHA = "0123456789abcdef" * 4
MODEL = "chest-abd-effnet-v1"
CHEST = InstanceResult(True, (), "chest", 0.87, {"abd": 0.13, "chest": 0.87}, MODEL, SHA)
ABD_MISMATCH = InstanceResult(True, (), "abd", 0.75, {"abd": 0.75, "chest": 0.25}, MODEL, SHA, True)
REJECTED = InstanceResult(
    False, ("modality CT not in [CR, DX]", "multi-frame"), None, None, None, None, None
)
NOT_CLASSIFIED = InstanceResult(True, (), None, None, None, None, None)
STRIP = 8  # legend strip rows below the image in the test overlays


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def radiograph(
    charset: str | list[str] = "ISO_IR 100",
    name: str = "Müller^Jörg",
    size: int = 64,
    study_uid: str | None = None,
) -> Dataset:
    """A DX For Presentation chest radiograph, 8-bit MONOCHROME2, with its file meta."""
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.PatientID = "RG-PAT-1"
    ds.PatientBirthDate = "19610203"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = "20240105"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "S1"
    ds.ReferringPhysicianName = "REFERRER^ROSA"
    ds.StudyDescription = "XR CHEST"
    ds.Modality = "DX"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "ACME Imaging"
    ds.ManufacturerModelName = "DR-100"
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = np.add.outer(np.arange(size), np.arange(size)).astype(np.uint8)
    ds.PixelData = pixels.tobytes()
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    ds.RescaleType = "US"
    ds.WindowCenter = 128
    ds.WindowWidth = 256
    ds.LossyImageCompression = "00"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([code("816094009", "SCT", "Chest")])
    ds.ViewCodeSequence = DicomSequence([code("399348003", "SCT", "postero-anterior")])
    ds.PositionerType = "COLUMN"
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [0.7, 0.7]
    ds.AcquisitionContextSequence = DicomSequence([])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "MODALITY1"
    ds.file_meta = meta
    return ds


def compressed(ds: Dataset) -> Dataset:
    """`ds` as JPEG 2000 lossless, keeping its SOP Instance UID."""
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return ds


def overlay_for(ds: Dataset) -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (ds.Rows + STRIP, ds.Columns, 3), dtype=np.uint8)


def make_sc(source: Dataset, result: InstanceResult = CHEST, **kwargs: Any) -> Dataset:
    arguments: dict[str, Any] = {
        "series_instance_uid": generate_uid(),
        "sop_instance_uid": generate_uid(),
    }
    arguments.update(kwargs)
    return gradcam_secondary_capture(source, overlay_for(source), result, **arguments)


def make_sr(sources: list[Dataset], results: list[InstanceResult]) -> Dataset:
    return result_report(
        sources, results, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid()
    )


def round_trip(ds: Dataset, tmp_path: Path, name: str = "out.dcm") -> pydicom.FileDataset:
    path = tmp_path / name
    write_dataset(ds, path)
    return pydicom.dcmread(path)


def radgate_block(ds: Dataset) -> Any:
    return ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)


def block_contents(ds: Dataset) -> dict[int, tuple[str, Any]]:
    """Offset -> (VR, value) of every element in the RADGATE block."""
    block = radgate_block(ds)
    found = {}
    for offset in range(0x100):
        tag = block.get_tag(offset)
        if tag in ds:
            found[offset] = (ds[tag].VR, ds[tag].value)
    return found


@pytest.fixture
def source() -> Dataset:
    return radiograph()


# ------------------------------------------------------------------------ InstanceResult


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((True, ("x",), None, None, None, None, None), "passed the gate but has reasons"),
        ((False, (), None, None, None, None, None), "rejected by the gate has no reasons"),
        ((False, ("x",), "abd", 0.5, None, MODEL, SHA), "rejected by the gate has label"),
        ((True, (), "knee", 0.5, None, MODEL, SHA), "label 'knee' not one of"),
        ((True, (), "abd", None, None, MODEL, SHA), "has no probability"),
        ((True, (), "abd", 1.5, None, MODEL, SHA), r"probability 1.5 not in \[0, 1\]"),
        ((True, (), "abd", float("nan"), None, MODEL, SHA), "not in"),
        ((True, (), "abd", 0.5, None, None, SHA), "model_id None"),
        ((True, (), "abd", 0.5, None, "a\\b", SHA), "model_id"),
        ((True, (), "abd", 0.5, None, "m" * 65, SHA), "longer than 64"),
        ((True, (), "abd", 0.5, None, MODEL, "ABC"), "weights_sha256 'ABC'"),
        ((True, (), "abd", 0.5, {"knee": 0.1}, MODEL, SHA), "probabilities: label 'knee'"),
        ((False, "modality CT", None, None, None, None, None), "not the text"),
    ],
)
def test_inconsistent_results_are_refused(arguments: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InstanceResult(*arguments)


def test_mismatch_without_label_is_refused() -> None:
    with pytest.raises(ValueError, match="body_part_mismatch"):
        InstanceResult(True, (), None, None, None, None, None, body_part_mismatch=True)


def test_numpy_probabilities_are_accepted() -> None:
    # A numpy scalar, as a probability taken straight from a tensor often is.
    result = InstanceResult(True, (), "abd", np.float32(0.25), None, MODEL, SHA)  # type: ignore[arg-type]
    assert block_contents(tag_original(radiograph(), result))[0x02] == ("DS", 0.25)


# ------------------------------------------------------------------------- Secondary Capture


def test_secondary_capture_is_a_new_series_in_the_source_study(
    source: Dataset, tmp_path: Path
) -> None:
    series_uid, instance_uid = generate_uid(), generate_uid()
    sc = round_trip(
        make_sc(source, series_instance_uid=series_uid, sop_instance_uid=instance_uid), tmp_path
    )
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.SOPInstanceUID == instance_uid
    assert sc.SeriesInstanceUID == series_uid != source.SeriesInstanceUID
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientID == source.PatientID
    assert sc.PatientName == source.PatientName
    assert sc.PatientBirthDate == source.PatientBirthDate
    assert sc.AccessionNumber == source.AccessionNumber
    assert sc.StudyDescription == source.StudyDescription
    assert sc.SeriesDescription == "radgate Grad-CAM"
    assert sc.SeriesNumber == 9901
    assert sc.Manufacturer == "radgate"
    assert sc.Modality == "OT"
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.ConversionType == "WSD"
    assert sc.BurnedInAnnotation == "YES"
    assert list(sc.PatientOrientation) == ["L", "F"]
    assert sc.BodyPartExamined == "CHEST"


def test_secondary_capture_references_its_source(source: Dataset, tmp_path: Path) -> None:
    sc = round_trip(make_sc(source), tmp_path)
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    purpose = reference.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodingSchemeDesignator, purpose.CodeValue) == ("DCM", "121322")


def test_secondary_capture_pixels_are_the_overlay_legend_included(
    source: Dataset, tmp_path: Path
) -> None:
    overlay = overlay_for(source)
    sc = round_trip(
        gradcam_secondary_capture(
            source,
            overlay,
            CHEST,
            series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
        ),
        tmp_path,
    )
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (sc.Rows, sc.Columns) == (source.Rows + STRIP, source.Columns)
    assert (sc.SamplesPerPixel, sc.PhotometricInterpretation) == (3, "RGB")
    assert sc.BitsAllocated == 8
    np.testing.assert_array_equal(sc.pixel_array, overlay)


def test_secondary_capture_says_what_it_shows(source: Dataset, tmp_path: Path) -> None:
    sc = round_trip(make_sc(source, ABD_MISMATCH), tmp_path)
    description = sc.DerivationDescription
    assert "Grad-CAM" in description
    assert MODEL in description
    assert "ABD" in description
    assert "0.750" in description
    assert block_contents(sc) == {
        0x01: ("CS", "ABD"),
        0x02: ("DS", 0.75),
        0x03: ("LO", MODEL),
        0x04: ("LO", SHA),
        0x05: ("CS", "PASSED"),
        0x07: ("CS", "YES"),
    }


def test_secondary_capture_file_meta_names_radgate(source: Dataset, tmp_path: Path) -> None:
    sc = round_trip(make_sc(source), tmp_path)
    assert sc.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
    assert sc.file_meta.MediaStorageSOPInstanceUID == sc.SOPInstanceUID
    assert sc.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID


def test_secondary_capture_of_a_lossy_source_is_lossy(source: Dataset, tmp_path: Path) -> None:
    source.LossyImageCompression = "01"
    source.LossyImageCompressionRatio = 9.5
    source.LossyImageCompressionMethod = "ISO_10918_1"
    sc = round_trip(make_sc(source), tmp_path)
    assert sc.LossyImageCompression == "01"
    assert sc.LossyImageCompressionMethod == "ISO_10918_1"
    assert round_trip(make_sc(radiograph()), tmp_path).LossyImageCompression == "00"


def test_secondary_capture_without_source_orientation_leaves_it_empty(
    source: Dataset, tmp_path: Path
) -> None:
    del source.PatientOrientation
    del source.BodyPartExamined
    sc = round_trip(make_sc(source), tmp_path)
    assert "PatientOrientation" in sc and not sc.PatientOrientation
    assert "Laterality" in sc and not sc.Laterality


def test_secondary_capture_of_a_compressed_source(tmp_path: Path) -> None:
    source = compressed(radiograph())
    sc = round_trip(make_sc(source), tmp_path)
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"], ids=str)
def test_secondary_capture_names_the_missing_attribute(source: Dataset, keyword: str) -> None:
    delattr(source, keyword)
    with pytest.raises(ValueError, match=f"source has no {keyword}"):
        make_sc(source)


def test_secondary_capture_needs_a_classified_result(source: Dataset) -> None:
    with pytest.raises(ValueError, match="not classified"):
        make_sc(source, REJECTED)


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        (np.zeros((72, 64, 3), np.float32), "uint8"),
        (np.zeros((72, 64), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((72, 60, 3), np.uint8), "60 pixels wide, the source's Columns is 64"),
        (np.zeros((40, 64, 3), np.uint8), "40 pixels high, less than the source's Rows 64"),
    ],
)
def test_secondary_capture_refuses_a_wrong_overlay(
    source: Dataset, overlay: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        gradcam_secondary_capture(
            source,
            overlay,
            CHEST,
            series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
        )


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_secondary_capture_refuses_the_source_uids(source: Dataset) -> None:
    with pytest.raises(
        ValueError, match="series_instance_uid .* equals the source's SeriesInstanceUID"
    ):
        make_sc(source, series_instance_uid=source.SeriesInstanceUID)
    with pytest.raises(ValueError, match="sop_instance_uid .* equals the source's SOPInstanceUID"):
        make_sc(source, sop_instance_uid=source.SOPInstanceUID)
    with pytest.raises(ValueError, match="not a valid UID"):
        make_sc(source, sop_instance_uid="1.2.abc")


# ------------------------------------------------------------------------- tagged originals


def test_tag_original_leaves_the_source_untouched(source: Dataset) -> None:
    before = copy.deepcopy(source)
    tagged = tag_original(source, CHEST)
    assert tagged is not source
    assert source == before
    assert source.file_meta == before.file_meta
    assert (PRIVATE_GROUP, 0x0010) not in source
    assert (PRIVATE_GROUP, 0x0010) in tagged


def test_tag_original_keeps_identity_and_meta(source: Dataset, tmp_path: Path) -> None:
    tagged = round_trip(tag_original(source, CHEST), tmp_path)
    assert tagged.SOPInstanceUID == source.SOPInstanceUID
    assert tagged.SeriesInstanceUID == source.SeriesInstanceUID
    assert tagged.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    assert tagged.file_meta.MediaStorageSOPClassUID == source.SOPClassUID
    assert tagged.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert tagged.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert tagged.file_meta.SourceApplicationEntityTitle == "MODALITY1"
    assert tagged.PixelData == source.PixelData


def test_tag_original_classified_block(source: Dataset, tmp_path: Path) -> None:
    tagged = round_trip(tag_original(source, CHEST), tmp_path)
    block = radgate_block(tagged)
    assert block[0x01].VR == "CS" and block[0x01].value == "CHEST"
    assert block[0x02].VR == "DS" and block[0x02].value == 0.87
    assert block[0x03].VR == "LO" and block[0x03].value == MODEL
    assert block[0x04].VR == "LO" and block[0x04].value == SHA
    assert block[0x05].VR == "CS" and block[0x05].value == "PASSED"
    assert block[0x07].VR == "CS" and block[0x07].value == "NO"
    assert set(block_contents(tagged)) == {0x01, 0x02, 0x03, 0x04, 0x05, 0x07}
    assert tagged[PRIVATE_GROUP, 0x0010].value == "RADGATE"


def test_tag_original_rejected_block(source: Dataset, tmp_path: Path) -> None:
    tagged = round_trip(tag_original(source, REJECTED), tmp_path)
    assert block_contents(tagged) == {
        0x05: ("CS", "REJECTED"),
        0x06: ("LT", "modality CT not in [CR, DX]; multi-frame"),
    }


def test_tag_original_passed_but_not_classified(source: Dataset) -> None:
    assert block_contents(tag_original(source, NOT_CLASSIFIED)) == {0x05: ("CS", "PASSED")}


def test_tag_original_probability_fits_ds(source: Dataset, tmp_path: Path) -> None:
    result = InstanceResult(True, (), "chest", 0.123456789012345678, None, MODEL, SHA)
    tagged = round_trip(tag_original(source, result), tmp_path)
    raw = radgate_block(tagged)[0x02].value
    assert len(str(raw)) <= 16
    assert float(raw) == pytest.approx(0.123456789012345678, abs=1e-13)


def test_tag_original_replaces_an_earlier_result(source: Dataset) -> None:
    rejected = tag_original(source, REJECTED)
    assert block_contents(rejected)[0x05] == ("CS", "REJECTED")  # caches the block lookup
    before = copy.deepcopy(rejected)
    again = tag_original(rejected, ABD_MISMATCH)
    assert rejected == before
    contents = block_contents(again)
    assert 0x06 not in contents
    assert contents[0x05] == ("CS", "PASSED")
    assert contents[0x01] == ("CS", "ABD")


def test_tag_original_leaves_other_private_blocks(source: Dataset, tmp_path: Path) -> None:
    other = source.private_block(PRIVATE_GROUP, "ACME 1.0", create=True)
    other.add_new(0x01, "LO", "vendor value")
    tagged = round_trip(tag_original(source, CHEST), tmp_path)
    assert tagged.private_block(PRIVATE_GROUP, "ACME 1.0")[0x01].value == "vendor value"
    assert radgate_block(tagged)[0x01].value == "CHEST"
    assert radgate_block(tagged).block_start != other.block_start


def test_tag_original_of_a_compressed_source_keeps_its_pixel_bytes(tmp_path: Path) -> None:
    source = compressed(radiograph())
    pixel_bytes = bytes(source.PixelData)
    tagged = tag_original(source, CHEST)
    assert tagged.PixelData == pixel_bytes
    assert tagged.file_meta.TransferSyntaxUID == JPEG2000Lossless

    read = round_trip(tagged, tmp_path)
    assert read.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert read.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    assert read.PixelData == pixel_bytes
    assert source.PixelData == pixel_bytes
    np.testing.assert_array_equal(read.pixel_array, radiograph().pixel_array)
    assert radgate_block(read)[0x01].value == "CHEST"


def test_tag_original_of_an_implicit_vr_file_is_written_explicit(tmp_path: Path) -> None:
    source = radiograph()
    source.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = tmp_path / "implicit.dcm"
    source.save_as(implicit, enforce_file_format=True)
    received = pydicom.dcmread(implicit)
    read = round_trip(tag_original(received, CHEST), tmp_path)
    assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert radgate_block(read)[0x02].VR == "DS"
    assert read.PatientName == "Müller^Jörg"
    assert read.PixelData == source.PixelData


def test_tag_original_refuses_big_endian(source: Dataset) -> None:
    source.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    with pytest.raises(ValueError, match="big endian"):
        tag_original(source, CHEST)


def test_tag_original_names_the_missing_attribute(source: Dataset) -> None:
    del source.SOPInstanceUID
    with pytest.raises(ValueError, match="source has no SOPInstanceUID"):
        tag_original(source, CHEST)


# --------------------------------------------------------------------------------------- SR


def concept(item: Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return name.CodingSchemeDesignator, name.CodeValue


def children(item: Dataset, scheme: str, value: str) -> list[Dataset]:
    return [child for child in item.ContentSequence if concept(child) == (scheme, value)]


def only(item: Dataset, scheme: str, value: str) -> Dataset:
    (found,) = children(item, scheme, value)
    return found


def coded_value(item: Dataset) -> tuple[str, str]:
    value = item.ConceptCodeSequence[0]
    return value.CodingSchemeDesignator, value.CodeValue


def instance_containers(report: Dataset) -> Iterator[Dataset]:
    return iter(children(report, "99RADGATE", "RG002"))


@pytest.fixture
def study() -> list[Dataset]:
    first = radiograph()
    second = compressed(radiograph(study_uid=first.StudyInstanceUID))
    third = radiograph(study_uid=first.StudyInstanceUID)
    return [first, second, third]


def test_report_is_a_new_series_in_the_study(study: list[Dataset], tmp_path: Path) -> None:
    report = round_trip(make_sr(study, [CHEST, ABD_MISMATCH, REJECTED]), tmp_path)
    assert report.SOPClassUID == EnhancedSRStorage
    assert report.Modality == "SR"
    assert report.SeriesDescription == "radgate result"
    assert report.SeriesNumber == 9902
    assert report.StudyInstanceUID == study[0].StudyInstanceUID
    assert report.PatientID == study[0].PatientID
    assert report.PatientName == study[0].PatientName
    assert report.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in study}
    assert report.Manufacturer == "radgate"
    assert report.CompletionFlag == "COMPLETE"
    assert report.VerificationFlag == "UNVERIFIED"
    assert concept(report) == ("99RADGATE", "RG001")


def test_report_references_every_source(study: list[Dataset], tmp_path: Path) -> None:
    report = round_trip(make_sr(study, [CHEST, ABD_MISMATCH, REJECTED]), tmp_path)
    referenced = []
    for container in instance_containers(report):
        image = only(container, "DCM", "121322")
        assert image.ValueType == "IMAGE"
        reference = image.ReferencedSOPSequence[0]
        referenced.append((reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID))
    assert referenced == [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in study]
    evidence = {
        instance.ReferencedSOPInstanceUID
        for item in report.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in study}


def test_report_content_per_instance(study: list[Dataset], tmp_path: Path) -> None:
    report = round_trip(make_sr(study, [CHEST, ABD_MISMATCH, REJECTED]), tmp_path)
    chest, abd, rejected = instance_containers(report)

    assert coded_value(only(chest, "99RADGATE", "RG003")) == ("99RADGATE", "RG004")
    assert coded_value(only(chest, "99RADGATE", "RG007")) == ("SCT", "816094009")
    probability = only(chest, "99RADGATE", "RG008")
    measured = probability.MeasuredValueSequence[0]
    assert float(measured.NumericValue) == pytest.approx(0.87)
    unit = measured.MeasurementUnitsCodeSequence[0]
    assert (unit.CodingSchemeDesignator, unit.CodeValue) == ("UCUM", "1")
    assert only(chest, "99RADGATE", "RG009").TextValue == SHA
    assert coded_value(only(chest, "99RADGATE", "RG010")) == ("SCT", "373067005")
    algorithm_name = only(chest, "DCM", "111001")
    assert algorithm_name.RelationshipType == "HAS CONCEPT MOD"
    assert algorithm_name.TextValue == MODEL
    assert only(chest, "DCM", "111003").TextValue == SHA[:12]
    assert not children(chest, "99RADGATE", "RG006")

    assert coded_value(only(abd, "99RADGATE", "RG007")) == ("SCT", "818981001")
    assert coded_value(only(abd, "99RADGATE", "RG010")) == ("SCT", "373066001")

    assert coded_value(only(rejected, "99RADGATE", "RG003")) == ("99RADGATE", "RG005")
    reasons = [item.TextValue for item in children(rejected, "99RADGATE", "RG006")]
    assert reasons == list(REJECTED.reasons)
    for absent in ("RG007", "RG008", "RG009", "RG010"):
        assert not children(rejected, "99RADGATE", absent)
    assert not children(rejected, "DCM", "111001")


def test_report_names_radgate_as_the_observer(study: list[Dataset], tmp_path: Path) -> None:
    report = round_trip(make_sr(study[:1], [CHEST]), tmp_path)
    observer_type = only(report, "DCM", "121005")
    assert observer_type.RelationshipType == "HAS OBS CONTEXT"
    assert coded_value(observer_type) == ("DCM", "121007")
    assert only(report, "DCM", "121013").TextValue == "radgate"


def test_report_of_a_source_without_type2_attributes(tmp_path: Path) -> None:
    source = radiograph()
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        delattr(source, keyword)
    report = round_trip(make_sr([source], [CHEST]), tmp_path)
    assert report.PatientID == source.PatientID
    assert "PatientBirthDate" in report and not report.PatientBirthDate
    assert "PatientBirthDate" not in source


def test_report_does_not_change_its_sources(study: list[Dataset]) -> None:
    before = copy.deepcopy(study)
    make_sr(study, [CHEST, ABD_MISMATCH, REJECTED])
    assert study == before


def test_report_refuses_inconsistent_input(study: list[Dataset]) -> None:
    with pytest.raises(ValueError, match="sources is empty"):
        make_sr([], [])
    with pytest.raises(ValueError, match="3 sources but 2 results"):
        make_sr(study, [CHEST, CHEST])
    other = radiograph()
    with pytest.raises(ValueError, match="source 2 StudyInstanceUID .* is not"):
        make_sr([study[0], other], [CHEST, CHEST])
    with pytest.raises(ValueError, match="source 2 SOPInstanceUID .* appears twice"):
        make_sr([study[0], study[0]], [CHEST, CHEST])
    stranger = radiograph(study_uid=study[0].StudyInstanceUID)
    stranger.PatientID = "SOMEONE-ELSE"
    with pytest.raises(ValueError, match="source 2 PatientID 'SOMEONE-ELSE'"):
        make_sr([study[0], stranger], [CHEST, CHEST])
    del study[2].StudyInstanceUID
    with pytest.raises(ValueError, match="source 3 has no StudyInstanceUID"):
        make_sr(study, [CHEST, CHEST, CHEST])
    with pytest.raises(ValueError, match="series_instance_uid .* equals"):
        result_report(
            study[:1],
            [CHEST],
            series_instance_uid=study[0].SeriesInstanceUID,
            sop_instance_uid=generate_uid(),
        )


# --------------------------------------------------------------------------- character sets

CHARACTER_SETS = [
    ("ISO_IR 100", "Müller^Jörg", "Müller".encode("latin-1")),
    ("ISO_IR 192", "山田^太郎", "山田".encode()),
    (
        ["", "ISO 2022 IR 87"],
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        b"\x1b$B" + "山田".encode("iso2022_jp")[3:-3],
    ),
]


@pytest.mark.parametrize(("charset", "name", "encoded"), CHARACTER_SETS, ids=lambda v: str(v))
def test_non_ascii_names_round_trip(
    charset: str | list[str], name: str, encoded: bytes, tmp_path: Path
) -> None:
    source = radiograph(charset=charset, name=name)
    made = {
        "sc": make_sc(source),
        "tagged": tag_original(source, CHEST),
        "sr": make_sr([source], [CHEST]),
    }
    for kind, ds in made.items():
        path = tmp_path / f"{kind}.dcm"
        write_dataset(ds, path)
        read = pydicom.dcmread(path)
        expected_charset = charset if isinstance(charset, str) else list(charset)
        actual_charset = read.SpecificCharacterSet
        if not isinstance(actual_charset, str):
            actual_charset = list(actual_charset)
        assert actual_charset == expected_charset, kind
        assert str(read.PatientName) == name, kind
        # The bytes in the file are in the declared character set, not re-encoded.
        assert encoded in path.read_bytes(), kind


# ------------------------------------------------------------------------------ write_dataset


def test_write_dataset_is_atomic_and_leaves_no_temporary(source: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"old content")
    write_dataset(tag_original(source, CHEST), path)
    assert pydicom.dcmread(path).SOPInstanceUID == source.SOPInstanceUID
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instance.dcm"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_dataset_failure_keeps_the_old_file(
    source: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"old content")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(outputs, "dcmwrite", broken)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(source, path)
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instance.dcm"]


def test_write_dataset_does_not_change_the_dataset(tmp_path: Path) -> None:
    source = radiograph()
    source.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta_before = copy.deepcopy(source.file_meta)
    write_dataset(source, tmp_path / "x.dcm")
    assert source.file_meta == meta_before
    assert pydicom.dcmread(tmp_path / "x.dcm").file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_write_dataset_without_file_meta(source: Dataset, tmp_path: Path) -> None:
    del source.file_meta
    write_dataset(source, tmp_path / "x.dcm")
    read = pydicom.dcmread(tmp_path / "x.dcm")
    assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert read.file_meta.MediaStorageSOPInstanceUID == UID(source.SOPInstanceUID)
