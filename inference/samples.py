"""`radgate samples`: the sample PNG radiographs wrapped as DICOM studies.

Each PNG of the chosen split(s) becomes one study with one series and one instance,
alternately a CR and a DX (For Presentation) image, with a synthetic but searchable
patient (``RADGATE^SAMPLE^<n>``, ``RG<n>``). The plain wrap stores the PNG's 8-bit grey
values unchanged, with the window (centre 128, width 256) that maps them back to
``value / 255``: the DICOM path and the PNG path give the same pixels.

``--variants`` adds, for every PNG of the test split, the cases a gateway meets in
practice, each as its own study: MONOCHROME1, 12-bit stored with rescale and window,
JPEG Baseline, JPEG 2000, BodyPartExamined missing, BodyPartExamined wrong, and a CT
image that the gate must reject.

Everything is deterministic: UIDs come from the PNG's content hash and path
(`generate_uid(entropy_srcs=...)`), dates and numbers from the PNG's position in the
data folder, so a rerun writes the same files. `OUT/manifest.json` describes every file
written, with what the gate and the classifier are expected to do with it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

from inference.errors import RadgateError
from inference.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

SPLITS = ("train", "val", "test")
SPLIT_CHOICES = (*SPLITS, "all")
LABELS = ("abd", "chest")
BODY_PART = {"abd": "ABDOMEN", "chest": "CHEST"}
# The usual projection of each examination: abdomen supine AP, chest erect PA.
VIEW = {"abd": ("AP", codes.SCT.AnteroPosterior), "chest": ("PA", codes.SCT.PosteroAnterior)}
ANATOMY = {"ABDOMEN": codes.SCT.Abdomen, "CHEST": codes.SCT.Chest}
MANIFEST_NAME = "manifest.json"
INSTANCE_NAME = "IM0001.dcm"
FIRST_STUDY_DATE = dt.date(2024, 1, 1)
JPEG_QUALITY = 90

# Window that maps 8-bit stored values v to exactly v / 255 (PS3.3 C.11.2.1.2.1):
# lower edge c - 0.5 - (w - 1) / 2 = 0, span w - 1 = 255.
WINDOW_8BIT = (128.0, 256.0)
# The 12-bit variant: stored = 16 v + 8, modality value = stored * 0.5 - 1000 = 8 v - 996,
# and the window spans exactly -996 .. 1044, so it too decodes to v / 255.
RESCALE_SLOPE = 0.5
RESCALE_INTERCEPT = -1000.0
WINDOW_12BIT = (24.5, 2041.0)
# The CT variant: a plausible HU range (stored 4 v, intercept -1024), lung-ish window.
CT_INTERCEPT = -1024.0
CT_WINDOW = (-500.0, 1500.0)


@dataclass(frozen=True)
class Source:
    """One sample PNG and what the wrap derives from it."""

    path: Path
    split: str
    label: str  # "abd" or "chest", from the folder
    number: int  # position among all the data folder's PNGs: the patient number
    digest: str  # sha256 of the file

    @property
    def relative(self) -> str:
        return f"{self.split}/{self.label}/{self.path.name}"

    @property
    def modality(self) -> str:
        """The plain wrap's modality: CR and DX alternate."""
        return "CR" if self.number % 2 == 0 else "DX"


@dataclass(frozen=True)
class Variant:
    """How one study departs from the plain wrap, and what the gateway should make of it."""

    name: str
    description: str
    expected_gate: str = "passed"
    expected_reasons: tuple[str, ...] = ()
    expected_flags: tuple[str, ...] = ()
    exact_pixels: bool = True  # decodes to exactly the PNG's values / 255


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("plain", "8-bit MONOCHROME2 as the PNG"),
        Variant("monochrome1", "MONOCHROME1, inverted", exact_pixels=False),
        Variant("rescale16", "12-bit with rescale and window"),
        Variant("jpeg-baseline", "JPEG Baseline, lossy", exact_pixels=False),
        Variant("jpeg2000", "JPEG 2000 lossless"),
        Variant("body-part-missing", "body part missing"),
        Variant(
            "body-part-wrong",
            "body part wrong",
            expected_flags=("body part mismatch",),
        ),
        Variant(
            "ct",
            "CT, not a radiograph",
            expected_gate="rejected",
            expected_reasons=("modality CT not in [CR, DX]",),
            exact_pixels=False,
        ),
    )
}


@dataclass
class ManifestEntry:
    """One written file: `OUT/manifest.json` is a list of these."""

    path: str  # relative to the output folder
    source_png: str
    split: str
    variant: str
    modality: str
    sop_class_uid: str
    transfer_syntax: str
    body_part: str | None
    expected_label: str | None  # None when the gate must reject the image
    expected_gate: str  # "passed" or "rejected"
    expected_reasons: list[str]
    expected_flags: list[str]
    pixels_equal_png: bool  # decodes to exactly the PNG's grey values / 255
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    patient_name: str
    patient_id: str
    accession_number: str


def command(args: argparse.Namespace) -> int:
    """`radgate samples --data DIR --out DIR [--variants] [--split SPLIT]`."""
    # The JPEG 2000 encoder logs every tile at INFO: noise in a command's output.
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    entries = make_samples(Path(args.data), Path(args.out), args.split, args.variants)
    print(summary_table(entries))
    print(f"{len(entries)} files and {MANIFEST_NAME} written to {args.out}")
    return 0


def make_samples(
    data_dir: Path, out_dir: Path, split: str = "test", variants: bool = False
) -> list[ManifestEntry]:
    """Write the DICOM files and the manifest; return the manifest's entries."""
    if split not in SPLIT_CHOICES:
        raise RadgateError(f"--split {split!r} not one of {', '.join(SPLIT_CHOICES)}")
    sources = find_sources(data_dir)
    wanted = SPLITS if split == "all" else (split,)
    plan: list[tuple[Source, Variant]] = [
        (source, VARIANTS["plain"]) for source in sources if source.split in wanted
    ]
    if variants:
        plan += [
            (source, variant)
            for source in sources
            if source.split == "test"
            for variant in VARIANTS.values()
            if variant.name != "plain"
        ]
    if not plan:
        raise RadgateError(f"{data_dir}: no PNG files in split {split!r}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RadgateError(f"cannot create output folder {out_dir}: {error}") from error
    entries = [write_sample(source, variant, out_dir) for source, variant in plan]
    manifest = json.dumps([asdict(entry) for entry in entries], indent=2) + "\n"
    _write_atomic(out_dir / MANIFEST_NAME, lambda handle: handle.write(manifest.encode()))
    return entries


def find_sources(data_dir: Path) -> list[Source]:
    """Every `{train,val,test}/{abd,chest}/*.png`, numbered in a stable order."""
    if not data_dir.is_dir():
        raise RadgateError(f"data folder {data_dir} not found")
    paths = [
        (split, label, path)
        for split in SPLITS
        for label in LABELS
        for path in sorted((data_dir / split / label).glob("*.png"))
    ]
    if not paths:
        raise RadgateError(
            f"{data_dir}: no PNG files in {{train,val,test}}/{{abd,chest}}/ (see `make data`)"
        )
    return [
        Source(path, split, label, number, hashlib.sha256(path.read_bytes()).hexdigest())
        for number, (split, label, path) in enumerate(paths, start=1)
    ]


def read_grey_png(path: Path) -> tuple[np.ndarray, bool]:
    """The PNG as 8-bit grey (H, W) and whether that is exactly what the file holds.

    The sample PNGs are RGB files; most have three equal channels, which are taken as
    they are. A few carry slight colour; those become ITU-R 601 luma (Pillow's "L").
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "L":
                return np.asarray(image, dtype=np.uint8), True
            if image.mode in ("RGB", "RGBA"):
                rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
                red = rgb[..., 0]
                if np.array_equal(red, rgb[..., 1]) and np.array_equal(red, rgb[..., 2]):
                    return np.ascontiguousarray(red), True
                return np.asarray(image.convert("L"), dtype=np.uint8), False
            if image.mode in ("LA", "P"):
                return np.asarray(image.convert("L"), dtype=np.uint8), False
            raise RadgateError(f"{path}: PNG mode {image.mode} not supported (8-bit expected)")
    except OSError as error:
        raise RadgateError(f"{path}: {error}") from error


def write_sample(source: Source, variant: Variant, out_dir: Path) -> ManifestEntry:
    """Build one study for `source` as `variant`, write it atomically, describe it."""
    grey, exact = read_grey_png(source.path)
    ds = build_dataset(source, variant, grey)
    folder = f"{source.split}-{source.label}-{_safe(source.path.stem)}-{variant.name}"
    relative = f"{folder}/{INSTANCE_NAME}"
    (out_dir / folder).mkdir(exist_ok=True)
    _write_atomic(
        out_dir / relative,
        lambda handle: dcmwrite(handle, ds, enforce_file_format=True),
    )
    body_part = str(ds.get("BodyPartExamined") or "") or None
    rejected = variant.expected_gate == "rejected"
    return ManifestEntry(
        path=relative,
        source_png=str(source.path.resolve()),
        split=source.split,
        variant=variant.name,
        modality=str(ds.Modality),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        body_part=body_part,
        expected_label=None if rejected else source.label,
        expected_gate=variant.expected_gate,
        expected_reasons=list(variant.expected_reasons),
        expected_flags=list(variant.expected_flags),
        pixels_equal_png=exact and variant.exact_pixels,
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        patient_name=str(ds.PatientName),
        patient_id=str(ds.PatientID),
        accession_number=str(ds.AccessionNumber),
    )


def build_dataset(source: Source, variant: Variant, grey: np.ndarray) -> Dataset:
    """The complete dataset (with file meta) for one source PNG and variant."""
    modality = source.modality
    if variant.name == "ct":
        modality = "CT"
    elif variant.name == "rescale16":
        # DX For Presentation fixes Rescale Slope 1 and Intercept 0: CR carries the rescale.
        modality = "CR"
    body_part = BODY_PART[source.label]
    if variant.name == "body-part-wrong":
        body_part = BODY_PART["chest" if source.label == "abd" else "abd"]
    if variant.name == "body-part-missing":
        body_part = ""

    def uid(level: str) -> UID:
        return generate_uid(entropy_srcs=[source.digest, source.relative, variant.name, level])

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    _patient_and_study(ds, source, variant, body_part, uid("study"))
    _series_and_equipment(ds, variant, modality, body_part, uid("series"))
    ds.SOPClassUID = {
        "CR": ComputedRadiographyImageStorage,
        "DX": DigitalXRayImageStorageForPresentation,
        "CT": CTImageStorage,
    }[modality]
    ds.SOPInstanceUID = uid("instance")
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.BurnedInAnnotation = "NO"

    if modality == "CT":
        _ct_image(ds, grey, uid("frame-of-reference"))
    else:
        _radiograph_image(ds, source, variant, modality, body_part, grey)

    transfer_syntax = ExplicitVRLittleEndian
    if variant.name == "jpeg-baseline":
        transfer_syntax = _encode_jpeg_baseline(ds, grey)
    ds.file_meta = _file_meta(ds, transfer_syntax)
    if variant.name == "jpeg2000":
        # pylibjpeg-openjpeg's encoder; lossless, so the pixels stay the PNG's. pydicom
        # would give the compressed copy a new random SOPInstanceUID: keep ours.
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        ds.file_meta = _file_meta(ds, JPEG2000Lossless)
    return ds


def _patient_and_study(
    ds: Dataset, source: Source, variant: Variant, body_part: str, study_uid: UID
) -> None:
    index = list(VARIANTS).index(variant.name)
    ds.PatientName = f"RADGATE^SAMPLE^{source.number}"
    ds.PatientID = f"RG{source.number}"
    ds.PatientBirthDate = f"{1940 + source.number % 60}0101"
    ds.PatientSex = "MF"[source.number % 2]
    ds.StudyInstanceUID = study_uid
    study_date = FIRST_STUDY_DATE + dt.timedelta(days=source.number)
    ds.StudyDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = f"{8 + index:02d}{int(source.digest[:4], 16) % 60:02d}00"
    ds.AccessionNumber = f"RGA{source.number:04d}{index:02d}"
    ds.StudyID = f"{source.number}.{index}"
    ds.ReferringPhysicianName = "SAMPLE^REFERRER"
    anatomy = {"CHEST": " CHEST", "ABDOMEN": " ABDOMEN"}.get(body_part, "")
    ds.StudyDescription = f"{'CT' if variant.name == 'ct' else 'XR'}{anatomy}"


def _series_and_equipment(
    ds: Dataset, variant: Variant, modality: str, body_part: str, series_uid: UID
) -> None:
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.SeriesDescription = f"radgate sample: {variant.description}"
    if body_part:
        ds.BodyPartExamined = body_part
    elif modality == "CR":
        # Type 2 in the CR Series module: present and empty is how CR says "unknown";
        # an unknown body part may be a paired one, which makes Laterality (type 2C) due.
        ds.BodyPartExamined = ""
        ds.Laterality = ""
    ds.Manufacturer = "radgate"
    ds.ManufacturerModelName = "radgate samples"
    ds.InstitutionName = "RADGATE SAMPLE SITE"
    ds.StationName = "RADGATE"
    ds.SoftwareVersions = IMPLEMENTATION_VERSION_NAME
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = ds.StudyTime
    ds.AcquisitionNumber = 1
    ds.PatientIdentityRemoved = "NO"


def _radiograph_image(
    ds: Dataset, source: Source, variant: Variant, modality: str, body_part: str, grey: np.ndarray
) -> None:
    view_position, view_code = VIEW[source.label]
    ds.ViewPosition = view_position
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    # Rows run to the patient's left and columns to the feet: the usual display.
    ds.PatientOrientation = ["L", "F"]
    monochrome1 = variant.name == "monochrome1"
    if variant.name == "rescale16":
        stored: np.ndarray = grey.astype(np.uint16) * 16 + 8
        _image_pixel(ds, stored, bits_stored=12)
        ds.RescaleSlope = RESCALE_SLOPE
        ds.RescaleIntercept = RESCALE_INTERCEPT
        window = WINDOW_12BIT
    else:
        stored = 255 - grey if monochrome1 else grey
        _image_pixel(ds, stored, bits_stored=8, monochrome1=monochrome1)
        if modality == "DX":
            ds.RescaleSlope = 1
            ds.RescaleIntercept = 0
        window = WINDOW_8BIT
    if "RescaleSlope" in ds:
        ds.RescaleType = "US"
    ds.WindowCenter, ds.WindowWidth = window
    ds.WindowCenterWidthExplanation = "FULL RANGE"
    ds.LossyImageCompression = "00"
    if modality != "DX":
        return
    # DX Series, DX Anatomy Imaged, DX Image, DX Detector, DX Positioning, Acquisition
    # Context: the attributes they require for a For Presentation image.
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([_code_item(ANATOMY[body_part])] if body_part else [])
    ds.ViewCodeSequence = DicomSequence([_code_item(view_code)])
    ds.PositionerType = "COLUMN"
    ds.DetectorType = "SCINTILLATOR"
    # Nominal: the sample PNGs are downscaled and their true spacing is unknown.
    ds.ImagerPixelSpacing = [0.7, 0.7]
    ds.AcquisitionContextSequence = DicomSequence([])


def _ct_image(ds: Dataset, grey: np.ndarray, frame_of_reference_uid: UID) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PixelSpacing = [0.7, 0.7]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.SliceThickness = 5
    ds.KVP = 120
    stored = grey.astype(np.uint16) * 4
    _image_pixel(ds, stored, bits_stored=12)
    ds.RescaleIntercept = CT_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = CT_WINDOW


def _image_pixel(
    ds: Dataset, stored: np.ndarray, bits_stored: int, monochrome1: bool = False
) -> None:
    bits_allocated = stored.dtype.itemsize * 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(stored, dtype=f"<u{stored.dtype.itemsize}").tobytes()


def _encode_jpeg_baseline(ds: Dataset, grey: np.ndarray) -> UID:
    """Replace the native pixels by one encapsulated JPEG Baseline frame (Pillow)."""
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    frame = buffer.getvalue()
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = round(grey.size / len(frame), 2)
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    return JPEGBaseline8Bit


def _file_meta(ds: Dataset, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _code_item(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


def _write_atomic(path: Path, write: Callable[[Any], object]) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    temporary: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", delete=False
        ) as handle:
            temporary = Path(handle.name)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # NamedTemporaryFile creates 0600; the samples are meant to be read by DICOM peers.
        temporary.chmod(0o644)
        os.replace(temporary, path)
    except BaseException:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise


def summary_table(entries: Sequence[ManifestEntry]) -> str:
    """The manifest as a short fixed-width table."""
    header = ("path", "variant", "modality", "body part", "expected")
    rows = [
        (
            entry.path,
            entry.variant,
            entry.modality,
            entry.body_part or "-",
            entry.expected_label or entry.expected_gate,
        )
        for entry in entries
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )
