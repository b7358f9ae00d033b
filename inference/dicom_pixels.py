"""DICOM pixel data to float32 in [0, 1], MONOCHROME2 convention (bright = dense).

`dataset_pixels` first checks the Image Pixel attributes (`pixel_header`) and refuses,
with a typed `InvalidInput`, anything that is not one decodable single-frame image of
a sane size: nothing is allocated for the pixels before that check passes. It then
decodes with pydicom's decoders (pylibjpeg, pyjpegls, pydicom's own RLE) and maps the
stored values through the display pipeline of PS3.3 C.11 / PS3.4 N.2:

    stored values -> Modality LUT (LUT or rescale) -> VOI LUT or window -> [0, 1]
    (-> inverted for MONOCHROME1)

Without a VOI LUT or window the modality values' own min..max is stretched to [0, 1].
Colour images (RGB, YBR_* decoded to RGB) are divided by their largest stored value;
the modality and VOI stages do not apply to them.

The window arithmetic is done here in float32 rather than with pydicom's
`apply_windowing`, which works in float64 and scales to the stored bit range: one
copy of the image, then in-place operations. For an 8-bit image with window
centre 128 and width 256 the result is bit-identical to ``pixels / 255``, the PNG path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from inference.errors import (
    DecoderMissing,
    ImageTooLarge,
    InvalidInput,
    MissingPixelAttribute,
    MultiFrame,
    NoPixelData,
    TruncatedPixelData,
    UndecodablePixels,
    UnsupportedBitsAllocated,
    UnsupportedPhotometric,
)

logger = logging.getLogger(__name__)

# Larger than any radiograph detector (43 cm at 0.1 mm is 4300 pixels), small enough
# that a forged header cannot make us allocate gigabytes: 2**27 float32 values are 512 MiB.
MAX_SIDE = 16384
MAX_PIXELS = 2**27
SUPPORTED_BITS_ALLOCATED = (8, 16)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour encodings the decoders return as RGB. YBR_ICT and YBR_RCT are the JPEG 2000
# colour transforms, undone by the codec itself.
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class PixelHeader:
    """The Image Pixel attributes of one single-frame image, checked."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str
    transfer_syntax: UID

    @property
    def expected_native_bytes(self) -> int:
        """Bytes a native (uncompressed) encoding of this image needs."""
        samples = self.rows * self.columns * self.samples_per_pixel
        if self.photometric == "YBR_FULL_422":
            # Two pixels share one Cb and one Cr sample: 2 samples a pixel, not 3.
            samples = self.rows * self.columns * 2
        return samples * self.bits_allocated // 8


def read_dicom_file(path: Path) -> np.ndarray:
    """A DICOM file to float32 pixels in [0, 1] (see `dataset_pixels`).

    A missing, unreadable, non-DICOM or truncated file raises `UndecodablePixels`
    naming the file and the problem.
    """
    try:
        dataset = dcmread(path, force=False)
    except InvalidDicomError as error:
        raise UndecodablePixels(f"{path}: not a DICOM file ({error})") from error
    except Exception as error:
        # A corrupt file can make pydicom's parser fail in many ways (OSError, EOFError,
        # struct.error, KeyError, ...): all of them mean the same thing here.
        raise UndecodablePixels(f"{path}: {type(error).__name__}: {error}") from error
    _check_complete(dataset, path)
    return dataset_pixels(dataset)


def dataset_pixels(ds: Dataset) -> np.ndarray:
    """A dataset's single frame as float32 in [0, 1]: grey (H, W) or RGB (H, W, 3).

    Grey output follows the MONOCHROME2 convention (bright = dense) whatever the
    stored photometric interpretation. Raises an `InvalidInput` subclass when the
    image is not one decodable frame (see `pixel_header`) or does not decode.
    """
    header = pixel_header(ds)
    stored = _decode(ds, header)
    if header.photometric in MONOCHROME:
        pixels = _modality_values(stored, ds)
        _to_unit_range(pixels, ds)
        if header.photometric == "MONOCHROME1":
            np.subtract(1.0, pixels, out=pixels)
        return pixels
    pixels = stored.astype(np.float32)
    pixels /= float(2**header.bits_stored - 1)
    return pixels


def pixel_header(ds: Dataset) -> PixelHeader:
    """Check, without decoding, that `ds` holds one image this module can decode.

    Raises `NoPixelData`, `MultiFrame`, `MissingPixelAttribute`, `ImageTooLarge`,
    `UnsupportedPhotometric`, `UnsupportedBitsAllocated`, `DecoderMissing`,
    `TruncatedPixelData` or `InvalidInput`, each with a short `reason`.
    """
    if "PixelData" not in ds:
        other = [name for name in ("FloatPixelData", "DoubleFloatPixelData") if name in ds]
        raise NoPixelData(f"{other[0]} is not supported" if other else "PixelData absent")
    frames = _optional_int(ds, "NumberOfFrames")
    if frames is not None and frames > 1:
        raise MultiFrame(frames)

    rows = _required_int(ds, "Rows")
    columns = _required_int(ds, "Columns")
    if rows < 1 or columns < 1:
        raise InvalidInput(f"image {columns}x{rows} empty")
    if rows > MAX_SIDE or columns > MAX_SIDE or rows * columns > MAX_PIXELS:
        raise ImageTooLarge(rows, columns, MAX_SIDE, MAX_PIXELS)

    photometric = _required_str(ds, "PhotometricInterpretation").upper()
    if photometric not in MONOCHROME + COLOUR:
        raise UnsupportedPhotometric(photometric)
    samples = _required_int(ds, "SamplesPerPixel")
    expected_samples = 1 if photometric in MONOCHROME else 3
    if samples != expected_samples:
        raise InvalidInput(
            f"SamplesPerPixel {samples} not valid for {photometric}",
            f"expected {expected_samples}",
        )

    bits_allocated = _required_int(ds, "BitsAllocated")
    if bits_allocated not in SUPPORTED_BITS_ALLOCATED:
        raise UnsupportedBitsAllocated(bits_allocated, SUPPORTED_BITS_ALLOCATED)
    bits_stored = _required_int(ds, "BitsStored")
    if not 1 <= bits_stored <= bits_allocated:
        raise InvalidInput(
            f"BitsStored {bits_stored} not valid",
            f"expected 1 to BitsAllocated ({bits_allocated})",
        )
    pixel_representation = _required_int(ds, "PixelRepresentation")
    if pixel_representation not in (0, 1):
        raise InvalidInput(
            f"PixelRepresentation {pixel_representation} not valid", "expected 0 or 1"
        )

    header = PixelHeader(
        rows=rows,
        columns=columns,
        samples_per_pixel=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=pixel_representation,
        photometric=photometric,
        transfer_syntax=_transfer_syntax(ds),
    )
    _check_decodable(ds, header)
    return header


def _check_decodable(ds: Dataset, header: PixelHeader) -> None:
    syntax = header.transfer_syntax
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as error:
        raise DecoderMissing(str(syntax), f"{syntax.name}: pydicom has no decoder") from error
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DecoderMissing(str(syntax), f"{syntax.name}: plugins missing: {missing}")

    element = ds["PixelData"]
    if not syntax.is_compressed:
        if element.is_undefined_length:
            raise UndecodablePixels(f"{syntax.name} with encapsulated pixel data")
        actual = len(element.value or b"")
        expected = header.expected_native_bytes
        if actual < expected:
            raise TruncatedPixelData(actual, expected)


def _decode(ds: Dataset, header: PixelHeader) -> np.ndarray:
    """The stored values of the one frame, YBR converted to RGB; may be a read-only view."""
    decoder = get_decoder(header.transfer_syntax)
    # A native image is viewed in place rather than copied: the caller copies it once,
    # to float32, anyway.
    options: dict[str, Any] = {} if header.transfer_syntax.is_compressed else {"view_only": True}
    try:
        stored, _ = decoder.as_array(ds, index=0, **options)
    except Exception as error:
        # Every plugin raises its own exception types (RuntimeError listing each plugin's
        # failure, ValueError, struct.error, ...); all mean the data does not decode.
        message = " ".join(str(error).split())
        raise UndecodablePixels(f"{header.transfer_syntax.name}: {message}") from error
    expected = (
        (header.rows, header.columns)
        if header.samples_per_pixel == 1
        else (header.rows, header.columns, header.samples_per_pixel)
    )
    if stored.shape != expected:
        raise UndecodablePixels(f"decoded shape {stored.shape}, header says {expected}")
    return stored


def _modality_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values through the Modality LUT or rescale, as a new float32 array."""
    if ds.get("ModalityLUTSequence"):
        try:
            return apply_modality_lut(stored, ds).astype(np.float32)
        except Exception as error:
            raise InvalidInput("Modality LUT not valid", str(error)) from error
    pixels = stored.astype(np.float32)
    slope = _optional_float(ds, "RescaleSlope")
    intercept = _optional_float(ds, "RescaleIntercept")
    if slope is not None and slope != 1.0:
        if slope == 0.0:
            raise InvalidInput("RescaleSlope 0 not valid", "every pixel would be the intercept")
        pixels *= slope
    if intercept is not None and intercept != 0.0:
        pixels += intercept
    return pixels


def _to_unit_range(values: np.ndarray, ds: Dataset) -> None:
    """Modality values to [0, 1] in place: VOI LUT, else window, else min..max."""
    lut = _voi_lut(ds)
    if lut is not None:
        _apply_voi_lut(values, *lut)
        return
    center = _first_float(ds, "WindowCenter")
    width = _first_float(ds, "WindowWidth")
    if center is not None and width is not None and _apply_window(values, ds, center, width):
        return
    low, high = float(values.min()), float(values.max())
    if high > low:
        values -= low
        values /= high - low
    else:
        values.fill(0.0)


def _apply_window(values: np.ndarray, ds: Dataset, center: float, width: float) -> bool:
    """The window of PS3.3 C.11.2.1.2 to [0, 1] in place; False if it is not usable."""
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        logger.warning("VOILUTFunction %r unknown; using LINEAR", function)
        function = "LINEAR"
    if not (width >= 1.0 if function == "LINEAR" else width > 0.0):
        logger.warning("WindowWidth %s not valid for %s; using the full range", width, function)
        return False
    if function == "SIGMOID":
        values -= center
        values *= -4.0 / width
        np.exp(values, out=values)
        values += 1.0
        np.reciprocal(values, out=values)
        return True
    if function == "LINEAR" and width == 1.0:
        # A one-value window is a threshold at center - 0.5.
        np.greater(values, center - 0.5, out=values, casting="unsafe")
        return True
    if function == "LINEAR":
        # ((x - (c - 0.5)) / (w - 1) + 0.5) rewritten as (x - lower) / span, clipped.
        lower, span = center - 0.5 - (width - 1.0) / 2.0, width - 1.0
    else:
        lower, span = center - width / 2.0, width
    values -= lower
    values /= span
    np.clip(values, 0.0, 1.0, out=values)
    return True


def _voi_lut(ds: Dataset) -> tuple[np.ndarray, int] | None:
    """The first VOI LUT's table (float32) and first mapped value, when there is one."""
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    if "LUTDescriptor" not in item or "LUTData" not in item:
        return None
    try:
        descriptor = [int(value) for value in item.LUTDescriptor]
        entries = descriptor[0] or 65536
        first_mapped = descriptor[1]
        data = item["LUTData"].value
        if isinstance(data, (bytes, bytearray, memoryview)):
            # OW: 16-bit words in the dataset's byte order.
            little_endian = ds.original_encoding[1] is not False
            table = np.frombuffer(data, dtype="<u2" if little_endian else ">u2")
        else:
            table = np.atleast_1d(np.asarray(data))
        table = table[:entries].astype(np.float32)
    except (TypeError, ValueError, IndexError) as error:
        raise InvalidInput("VOI LUT not valid", str(error)) from error
    if table.size == 0:
        raise InvalidInput("VOI LUT not valid", "LUTData empty")
    return table, first_mapped


def _apply_voi_lut(values: np.ndarray, table: np.ndarray, first_mapped: int) -> None:
    """Look the values up in the LUT (ends clamp), then the LUT's range to [0, 1], in place."""
    index = np.rint(values - first_mapped)
    np.clip(index, 0, table.size - 1, out=index)
    values[...] = table[index.astype(np.intp)]
    # LUT Descriptor's bit depth is unreliable in practice (12-bit tables declared as 16):
    # the table's own range is what the display is meant to span.
    low, high = float(table.min()), float(table.max())
    if high > low:
        values -= low
        values /= high - low
    else:
        values.fill(0.0)


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; a dataset built in memory is taken as native."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax:
        return UID(str(syntax))
    if ds["PixelData"].is_undefined_length:
        raise DecoderMissing("unknown", "encapsulated pixel data without a TransferSyntaxUID")
    implicit, little_endian = ds.original_encoding
    if little_endian is False:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _check_complete(ds: Dataset, path: Path) -> None:
    """Refuse a file that pydicom read without complaint although it ends too early.

    pydicom keeps a short last value as it is, and drops the whole data set when the
    file ends inside encapsulated pixel data or an undefined-length sequence.
    """
    if len(ds) == 0:
        raise UndecodablePixels(f"{path}: no data set after the file meta information")
    for element in ds.values():  # raw, as read: values() converts nothing
        if not isinstance(element, RawDataElement) or element.value is None:
            continue
        if element.length != UNDEFINED_LENGTH and len(element.value) < element.length:
            raise UndecodablePixels(
                f"{path}: file truncated in ({element.tag >> 16:04X},{element.tag & 0xFFFF:04X}):"
                f" {len(element.value)} of {element.length} bytes present"
            )


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception as error:
        # Values are converted lazily: a corrupt element fails here, not in dcmread.
        raise InvalidInput(f"{keyword} not readable", str(error)) from error


def _required_int(ds: Dataset, keyword: str) -> int:
    value = _optional_int(ds, keyword)
    if value is None:
        raise MissingPixelAttribute(keyword)
    return value


def _optional_int(ds: Dataset, keyword: str) -> int | None:
    value = _value(ds, keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"{keyword} {value!r} not valid", "expected an integer") from error


def _required_str(ds: Dataset, keyword: str) -> str:
    value = _value(ds, keyword)
    if not value:
        raise MissingPixelAttribute(keyword)
    return str(value).strip()


def _optional_float(ds: Dataset, keyword: str) -> float | None:
    value = _value(ds, keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"{keyword} {value!r} not valid", "expected a number") from error
    if not np.isfinite(number):
        raise InvalidInput(f"{keyword} {value!r} not valid", "expected a finite number")
    return number


def _first_float(ds: Dataset, keyword: str) -> float | None:
    """The first value of a multi-valued DS such as WindowCenter; None if absent or empty."""
    value = _value(ds, keyword)
    if value is None or value == "":
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__getitem__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"{keyword} {value!r} not valid", "expected a number") from error
    return number if np.isfinite(number) else None
