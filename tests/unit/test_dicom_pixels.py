"""DICOM pixel decoding: every transfer syntax, the display pipeline, every refusal."""

from __future__ import annotations

import io
import shutil
import subprocess
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_windowing
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from inference import dicom_pixels
from inference.dicom_pixels import dataset_pixels, pixel_header, read_dicom_file
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
from inference.preprocess import read_pixels

ROWS, COLUMNS = 48, 40


def grey8() -> np.ndarray:
    """An 8-bit image using the whole range: a gradient with noise, every value present."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 255, ROWS * COLUMNS).reshape(ROWS, COLUMNS)
    noisy = ramp + rng.normal(0, 6, ramp.shape)
    image = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    image.flat[:256] = np.arange(256, dtype=np.uint8)
    return image


def grey8_mid() -> np.ndarray:
    """An 8-bit image that does not reach 0 or 255: a window and min..max differ on it."""
    return np.clip(grey8(), 20, 230)


def grey12() -> np.ndarray:
    """A 12-bit image stored in 16 bits."""
    low_bits = np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS) % 16
    return (grey8().astype(np.uint16) * 16 + low_bits).astype(np.uint16)


def make_dataset(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    **attributes: Any,
) -> Dataset:
    """A minimal native (Explicit VR Little Endian) single-frame image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def received(ds: Dataset) -> Dataset:
    """The dataset as a receiver reads it: written to bytes and parsed again."""
    return pydicom.dcmread(io.BytesIO(encoded(ds)))


# --- the display pipeline ---------------------------------------------------------------


def test_window_128_256_gives_exactly_the_png_values() -> None:
    stored = grey8_mid()
    ds = make_dataset(stored, WindowCenter=128, WindowWidth=256)
    pixels = dataset_pixels(received(ds))
    assert pixels.dtype == np.float32
    assert pixels.shape == stored.shape
    assert np.array_equal(pixels, np.asarray(stored, dtype=np.float32) / 255.0)


def test_without_window_the_full_range_is_stretched() -> None:
    stored = (grey8() // 2 + 60).astype(np.uint8)  # 60..187
    assert stored.min() == 60 and stored.max() == 187
    pixels = dataset_pixels(make_dataset(stored))
    low, high = float(stored.min()), float(stored.max())
    np.testing.assert_allclose(pixels, (stored - low) / (high - low), atol=1e-6)
    assert pixels.min() == 0.0 and pixels.max() == 1.0


def test_constant_image_without_window_is_zero_not_nan() -> None:
    pixels = dataset_pixels(make_dataset(np.full((ROWS, COLUMNS), 77, np.uint8)))
    assert np.all(pixels == 0.0)


@pytest.mark.parametrize(
    ("function", "center", "width", "slope", "intercept"),
    [
        ("LINEAR", 2048, 4096, 1, 0),
        ("LINEAR", 1500, 801, 1, 0),
        ("LINEAR", 40, 400, 1, -1024),
        ("LINEAR", 700, 1500, 0.5, 100),
        ("LINEAR_EXACT", 1500, 800, 1, 0),
        ("SIGMOID", 2000, 1200, 1, 0),
        ("SIGMOID", 0, 900, 2, -2000),
    ],
)
def test_window_and_rescale_agree_with_pydicom(
    function: str, center: float, width: float, slope: float, intercept: float
) -> None:
    ds = make_dataset(
        grey12(),
        bits_stored=12,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=center,
        WindowWidth=width,
        VOILUTFunction=function,
    )
    ours = dataset_pixels(received(ds))
    # pydicom maps the window onto the rescaled stored range (PS3.4 N.2.1.1).
    theirs = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)
    y_min = intercept
    y_max = (2**12 - 1) * slope + intercept
    np.testing.assert_allclose(ours, (theirs - y_min) / (y_max - y_min), atol=2e-6)


def test_rescale_then_window_by_hand() -> None:
    stored = grey12()
    ds = make_dataset(
        stored,
        bits_stored=12,
        RescaleSlope=0.5,
        RescaleIntercept=-1000,
        WindowCenter=0,
        WindowWidth=1001,
    )
    modality = stored * 0.5 - 1000
    expected = np.clip((modality - (0 - 0.5 - 500)) / 1000, 0, 1)
    np.testing.assert_allclose(dataset_pixels(received(ds)), expected, atol=1e-6)


def test_multi_valued_window_uses_the_first() -> None:
    stored = grey8_mid()
    ds = make_dataset(stored, WindowCenter=[128, 10], WindowWidth=[256, 20])
    assert np.array_equal(dataset_pixels(received(ds)), stored.astype(np.float32) / 255.0)


def test_invalid_window_width_falls_back_to_the_full_range() -> None:
    stored = (grey8() // 2 + 60).astype(np.uint8)
    ds = make_dataset(stored, WindowCenter=100, WindowWidth=0)
    pixels = dataset_pixels(received(ds))
    assert pixels.min() == 0.0 and pixels.max() == 1.0


def test_one_value_linear_window_is_a_threshold() -> None:
    stored = grey8()
    ds = make_dataset(stored, WindowCenter=100, WindowWidth=1)
    pixels = dataset_pixels(received(ds))
    assert np.array_equal(pixels, (stored > 99.5).astype(np.float32))


def test_monochrome1_is_inverted_to_monochrome2() -> None:
    stored = grey8()
    mono1 = make_dataset(255 - stored, photometric="MONOCHROME1", WindowCenter=128, WindowWidth=256)
    mono2 = make_dataset(stored, WindowCenter=128, WindowWidth=256)
    inverted = dataset_pixels(received(mono1))
    np.testing.assert_allclose(inverted, dataset_pixels(received(mono2)), atol=1e-6)
    # Dense (bright in MONOCHROME2) where the stored MONOCHROME1 value is low.
    assert inverted[stored == 255].min() > 0.99 and inverted[stored == 0].max() < 0.01


def test_monochrome1_without_window_inverts_the_full_range() -> None:
    stored = (grey8() // 2 + 60).astype(np.uint8)
    pixels = dataset_pixels(make_dataset(stored, photometric="MONOCHROME1"))
    low, high = float(stored.min()), float(stored.max())
    np.testing.assert_allclose(pixels, 1 - (stored - low) / (high - low), atol=1e-6)


def test_signed_12_bit_pixels() -> None:
    values = grey12().astype(np.int16) - 2048  # -2048 .. 2047
    ds = make_dataset(values.astype(np.int16), bits_stored=12, signed=True)
    pixels = dataset_pixels(received(ds))
    low, high = float(values.min()), float(values.max())
    assert low < 0
    np.testing.assert_allclose(pixels, (values - low) / (high - low), atol=1e-6)


def test_signed_values_with_bits_above_bits_stored_are_sign_extended() -> None:
    # 12 bits stored in 16: -1 may arrive as 0x0FFF (high bits zero) or 0xFFFF.
    raw = np.array([[0x0FFF, 0x0800, 0x07FF, 0x0000]] * 32 * 8, dtype=np.uint16)
    raw = raw.reshape(32, 32)
    ds = make_dataset(raw, bits_stored=12, signed=True, WindowCenter=0, WindowWidth=4096)
    pixels = dataset_pixels(received(ds))
    # -1 -> just under half, -2048 -> 0, 2047 -> 1, 0 -> half
    np.testing.assert_allclose(pixels[0, :4], [2047 / 4095, 0, 1, 2048 / 4095], atol=1e-6)


@pytest.mark.parametrize("vr", ["OW", "US"])
def test_voi_lut_sequence_is_applied_and_preferred_to_the_window(vr: str) -> None:
    stored = grey12()
    table = np.round(4095 * (np.arange(4096) / 4095) ** 0.5).astype(np.uint16)  # a gamma curve
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]  # declared 16-bit, data 12-bit: common in practice
    if vr == "OW":
        item.add_new("LUTData", "OW", table.astype("<u2").tobytes())
    else:
        item.add_new("LUTData", "US", table.tolist())
    ds = make_dataset(stored, bits_stored=12, WindowCenter=10, WindowWidth=20)
    ds.VOILUTSequence = [item]
    pixels = dataset_pixels(received(ds))
    np.testing.assert_allclose(pixels, table[stored] / 4095, atol=1e-6)


def test_modality_lut_sequence_is_applied() -> None:
    stored = grey8()
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", (1000 - 2 * np.arange(256)).tolist())  # decreasing
    ds = make_dataset(stored)
    ds.ModalityLUTSequence = [item]
    pixels = dataset_pixels(received(ds))
    mapped = 1000 - 2 * stored.astype(float)
    np.testing.assert_allclose(
        pixels, (mapped - mapped.min()) / (mapped.max() - mapped.min()), atol=1e-6
    )


def test_rgb_is_scaled_to_unit_range() -> None:
    rgb = np.stack([grey8(), 255 - grey8(), np.full((ROWS, COLUMNS), 9, np.uint8)], axis=2)
    pixels = dataset_pixels(received(make_dataset(rgb, photometric="RGB")))
    assert pixels.shape == (ROWS, COLUMNS, 3)
    assert np.array_equal(pixels, rgb.astype(np.float32) / 255.0)


def test_dataset_without_file_meta_is_read_as_native() -> None:
    stored = grey8_mid()
    ds = make_dataset(stored, WindowCenter=128, WindowWidth=256)
    del ds.file_meta
    assert np.array_equal(dataset_pixels(ds), stored.astype(np.float32) / 255.0)


def test_read_pixels_goes_through_this_module_for_dicom(tmp_path: Path) -> None:
    stored = grey8_mid()
    path = tmp_path / "image.dcm"
    path.write_bytes(encoded(make_dataset(stored, WindowCenter=128, WindowWidth=256)))
    assert np.array_equal(read_pixels(path), stored.astype(np.float32) / 255.0)
    assert np.array_equal(read_dicom_file(path), stored.astype(np.float32) / 255.0)


def test_native_decode_allocates_little_more_than_the_output() -> None:
    big = (np.arange(1024 * 1024, dtype=np.uint32) % 4096).astype(np.uint16).reshape(1024, 1024)
    ds = make_dataset(big, bits_stored=12, RescaleSlope=2, WindowCenter=4000, WindowWidth=8000)
    tracemalloc.start()
    try:
        pixels = dataset_pixels(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # float32 output plus one masked uint16 copy: 1.5x. Any float64 step would be >= 3x.
    assert peak < 1.75 * pixels.nbytes


# --- transfer syntaxes ------------------------------------------------------------------


def compress_with_pydicom(ds: Dataset, syntax: UID, **options: Any) -> Dataset:
    ds.compress(syntax, **options)
    return ds


def compress_jpeg_baseline(ds: Dataset, quality: int = 95) -> Dataset:
    """Pillow encodes; pydicom only encapsulates (it has no JPEG Baseline encoder)."""
    image = Image.fromarray(ds.pixel_array, mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def compress_with_dcmtk(ds: Dataset, flag: str, tmp_path: Path) -> Dataset:
    """pydicom has no JPEG Lossless encoder: DCMTK's dcmcjpeg, a real-world encoder, is one."""
    dcmcjpeg = shutil.which("dcmcjpeg")
    assert dcmcjpeg, "dcmcjpeg (Debian package dcmtk, `make system-deps`) is required"
    source, target = tmp_path / "native.dcm", tmp_path / "jpeg-lossless.dcm"
    source.write_bytes(encoded(ds))
    subprocess.run([dcmcjpeg, flag, str(source), str(target)], check=True, timeout=60)
    return pydicom.dcmread(target)


LOSSLESS = [
    pytest.param(RLELossless, lambda ds, tmp: compress_with_pydicom(ds, RLELossless), id="rle"),
    pytest.param(
        JPEGLSLossless, lambda ds, tmp: compress_with_pydicom(ds, JPEGLSLossless), id="jpeg-ls"
    ),
    pytest.param(
        JPEG2000Lossless,
        lambda ds, tmp: compress_with_pydicom(ds, JPEG2000Lossless),
        id="jpeg2000-lossless",
    ),
    pytest.param(
        JPEGLossless, lambda ds, tmp: compress_with_dcmtk(ds, "+el", tmp), id="jpeg-lossless-p14"
    ),
    pytest.param(
        JPEGLosslessSV1,
        lambda ds, tmp: compress_with_dcmtk(ds, "+e1", tmp),
        id="jpeg-lossless-sv1",
    ),
]


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize(("syntax", "compress"), LOSSLESS)
def test_lossless_syntaxes_decode_to_the_original_pixels(
    syntax: UID, compress: Any, bits: int, tmp_path: Path
) -> None:
    stored = grey8() if bits == 8 else grey12()
    original = make_dataset(stored, bits_stored=bits, WindowCenter=1000, WindowWidth=3000)
    expected = dataset_pixels(received(original))
    compressed = received(compress(original, tmp_path))
    assert compressed.file_meta.TransferSyntaxUID == syntax
    assert compressed["PixelData"].is_undefined_length
    assert np.array_equal(dataset_pixels(compressed), expected)


@pytest.mark.parametrize(
    ("syntax", "compress", "tolerance"),
    [
        pytest.param(
            JPEGLSNearLossless,
            lambda ds: compress_with_pydicom(ds, JPEGLSNearLossless, jls_error=2),
            2 / 255 + 1e-6,
            id="jpeg-ls-near-lossless",
        ),
        pytest.param(
            JPEG2000,
            lambda ds: compress_with_pydicom(ds, JPEG2000, j2k_cr=[4]),
            0.12,
            id="jpeg2000",
        ),
        pytest.param(JPEGBaseline8Bit, compress_jpeg_baseline, 0.12, id="jpeg-baseline"),
    ],
)
def test_lossy_syntaxes_decode_close_to_the_original(
    syntax: UID, compress: Any, tolerance: float
) -> None:
    original = make_dataset(grey8(), WindowCenter=128, WindowWidth=256)
    expected = dataset_pixels(received(original))
    compressed = received(compress(original))
    assert compressed.file_meta.TransferSyntaxUID == syntax
    pixels = dataset_pixels(compressed)
    assert pixels.shape == expected.shape
    assert np.abs(pixels - expected).max() <= tolerance
    assert np.abs(pixels - expected).mean() < 0.02


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_other_native_syntaxes(syntax: UID) -> None:
    stored = grey12()
    ds = make_dataset(stored, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    expected = dataset_pixels(received(ds))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = stored.astype(">u2" if syntax == ExplicitVRBigEndian else "<u2").tobytes()
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(dataset_pixels(received(ds)), expected)


def test_deflated_explicit_vr_little_endian() -> None:
    stored = grey8_mid()
    ds = make_dataset(stored, WindowCenter=128, WindowWidth=256)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = encoded(ds)
    assert stored.tobytes() not in data  # really deflated
    read_back = pydicom.dcmread(io.BytesIO(data))
    assert read_back.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert np.array_equal(dataset_pixels(read_back), stored.astype(np.float32) / 255.0)


@pytest.mark.parametrize(
    ("syntax", "plugin"),
    [
        (JPEGBaseline8Bit, "pylibjpeg"),
        (JPEGLossless, "pylibjpeg"),
        (JPEGLosslessSV1, "pylibjpeg"),
        (JPEG2000Lossless, "pylibjpeg"),
        (JPEG2000, "pylibjpeg"),
        (JPEGLSLossless, "pyjpegls"),
        (JPEGLSNearLossless, "pyjpegls"),
        (RLELossless, "pylibjpeg"),
    ],
)
def test_installed_plugins_are_the_ones_pydicom_uses(syntax: UID, plugin: str) -> None:
    decoder = get_decoder(syntax)
    assert plugin in decoder.available_plugins, decoder.missing_dependencies
    # pydicom tries plugins in registration order; gdcm (not installed) aside, the
    # pylibjpeg plugins come first for every syntax they cover.
    # `available_plugins` is sorted by name; `_available` keeps the order pydicom tries.
    first = next(iter(decoder._available))
    assert first == ("pylibjpeg" if "pylibjpeg" in decoder.available_plugins else plugin)


def test_pylibjpeg_decodes_jpeg_baseline_itself() -> None:
    original = make_dataset(grey8())
    compressed = received(compress_jpeg_baseline(original))
    via_plugin, _ = get_decoder(JPEGBaseline8Bit).as_array(
        compressed, index=0, decoding_plugin="pylibjpeg"
    )
    assert np.array_equal(dataset_pixels(compressed), via_plugin.astype(np.float32) / 255.0)


def test_ybr_full_422_jpeg_is_returned_as_rgb() -> None:
    rgb = np.zeros((ROWS, COLUMNS, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = grey8()
    ds = make_dataset(rgb, photometric="RGB")
    buffer = io.BytesIO()
    # 4:2:2 chroma subsampling, as YBR_FULL_422 declares.
    Image.fromarray(rgb, mode="RGB").save(buffer, format="JPEG", quality=95, subsampling=1)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].is_undefined_length = True
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    pixels = dataset_pixels(received(ds))
    assert pixels.shape == (ROWS, COLUMNS, 3)
    assert np.abs(pixels - rgb / 255.0).mean() < 0.02


# --- refusals ---------------------------------------------------------------------------


def test_no_pixel_data() -> None:
    ds = make_dataset(grey8())
    del ds.PixelData
    with pytest.raises(NoPixelData) as caught:
        dataset_pixels(received(ds))
    assert caught.value.reason == "no pixel data"


def test_multi_frame() -> None:
    ds = make_dataset(grey8())
    ds.NumberOfFrames = 2
    ds.PixelData = grey8().tobytes() * 2
    with pytest.raises(MultiFrame) as caught:
        dataset_pixels(received(ds))
    assert caught.value.reason == "multi-frame"
    assert "2 frames" in str(caught.value)


def test_single_frame_with_number_of_frames_1_is_fine() -> None:
    ds = make_dataset(grey8(), NumberOfFrames=1, WindowCenter=128, WindowWidth=256)
    assert dataset_pixels(received(ds)).shape == (ROWS, COLUMNS)


@pytest.mark.parametrize("bits", [8, 16])
def test_truncated_native_pixel_data(bits: int) -> None:
    stored = grey8() if bits == 8 else grey12()
    ds = make_dataset(stored, bits_stored=bits if bits == 8 else 12)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(TruncatedPixelData) as caught:
        dataset_pixels(received(ds))
    assert caught.value.reason == "pixel data truncated"
    expected = ROWS * COLUMNS * bits // 8
    assert f"{expected // 2} bytes, expected {expected}" in caught.value.detail


@pytest.mark.parametrize(
    ("rows", "columns"),
    [(65535, 65535), (16385, 64), (64, 20000), (16384, 16384)],
)
def test_absurd_size_is_refused_before_any_allocation(rows: int, columns: int) -> None:
    ds = make_dataset(grey8())
    ds.Rows, ds.Columns = rows, columns
    ds = received(ds)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge) as caught:
            dataset_pixels(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason == f"image {columns}x{rows} too large"
    assert peak < 1_000_000  # bytes: nothing image-sized was attempted


@pytest.mark.parametrize("keyword", ["Rows", "Columns", "BitsAllocated", "SamplesPerPixel"])
def test_missing_image_pixel_attribute(keyword: str) -> None:
    ds = make_dataset(grey8())
    ds["PixelData"].VR = "OB"  # else writing needs BitsAllocated to choose OB or OW
    delattr(ds, keyword)
    with pytest.raises(MissingPixelAttribute) as caught:
        dataset_pixels(received(ds))
    assert caught.value.reason == f"{keyword} missing"


def test_zero_rows() -> None:
    ds = make_dataset(grey8())
    ds.Rows = 0
    with pytest.raises(InvalidInput) as caught:
        dataset_pixels(received(ds))
    assert caught.value.reason == f"image {COLUMNS}x0 empty"


@pytest.mark.parametrize("bits_allocated", [1, 12, 32])
def test_unsupported_bits_allocated(bits_allocated: int) -> None:
    ds = make_dataset(grey8())
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = min(bits_allocated, 8)
    ds.HighBit = ds.BitsStored - 1
    with pytest.raises(UnsupportedBitsAllocated) as caught:
        dataset_pixels(received(ds))
    assert caught.value.reason == f"BitsAllocated {bits_allocated} not supported"


def test_bits_stored_larger_than_allocated() -> None:
    ds = make_dataset(grey8())
    ds.BitsStored = 12
    with pytest.raises(InvalidInput) as caught:
        dataset_pixels(received(ds))
    assert caught.value.reason == "BitsStored 12 not valid"


@pytest.mark.parametrize("photometric", ["PALETTE COLOR", "YBR_PARTIAL_420", "CMYK"])
def test_unsupported_photometric(photometric: str) -> None:
    ds = make_dataset(grey8(), photometric=photometric)
    with pytest.raises(UnsupportedPhotometric) as caught:
        dataset_pixels(received(ds))
    assert photometric in caught.value.reason


def test_samples_per_pixel_must_match_photometric() -> None:
    ds = make_dataset(grey8(), photometric="RGB")
    with pytest.raises(InvalidInput) as caught:
        dataset_pixels(received(ds))
    assert caught.value.reason == "SamplesPerPixel 1 not valid for RGB"


def test_transfer_syntax_without_decoder() -> None:
    ds = make_dataset(grey8())
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video
    with pytest.raises(DecoderMissing) as caught:
        dataset_pixels(received(ds))
    assert caught.value.reason == "no decoder for transfer syntax 1.2.840.10008.1.2.4.100"


def test_decoder_whose_plugins_are_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg-openjpeg"]

    monkeypatch.setattr(dicom_pixels, "get_decoder", lambda syntax: Unavailable())
    ds = received(compress_with_pydicom(make_dataset(grey8()), JPEG2000Lossless))
    with pytest.raises(DecoderMissing) as caught:
        dataset_pixels(ds)
    assert caught.value.reason == f"no decoder for transfer syntax {JPEG2000Lossless}"
    assert "pylibjpeg-openjpeg" in caught.value.detail


def test_corrupt_compressed_data() -> None:
    ds = compress_with_pydicom(make_dataset(grey8()), JPEG2000Lossless)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    ds["PixelData"].is_undefined_length = True
    with pytest.raises(UndecodablePixels) as caught:
        dataset_pixels(received(ds))
    assert caught.value.reason == "pixel data does not decode"
    assert "JPEG 2000" in caught.value.detail


def test_header_check_alone_decodes_nothing() -> None:
    ds = received(make_dataset(grey12(), bits_stored=12))
    header = pixel_header(ds)
    assert (header.rows, header.columns, header.bits_stored) == (ROWS, COLUMNS, 12)
    assert header.expected_native_bytes == ROWS * COLUMNS * 2


# --- files ------------------------------------------------------------------------------


def test_non_dicom_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is not DICOM\n" * 20)
    with pytest.raises(UndecodablePixels) as caught:
        read_dicom_file(path)
    assert "not a DICOM file" in caught.value.detail
    assert str(path) in caught.value.detail


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UndecodablePixels) as caught:
        read_dicom_file(tmp_path / "absent.dcm")
    assert "absent.dcm" in caught.value.detail


def test_file_truncated_inside_native_pixel_data(tmp_path: Path) -> None:
    data = encoded(make_dataset(grey8()))
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(UndecodablePixels) as caught:
        read_dicom_file(path)
    assert "truncated in (7FE0,0010)" in caught.value.detail
    assert f"{ROWS * COLUMNS - 100} of {ROWS * COLUMNS} bytes" in caught.value.detail


def test_file_truncated_inside_encapsulated_pixel_data(tmp_path: Path) -> None:
    data = encoded(compress_with_pydicom(make_dataset(grey8()), RLELossless))
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 20])
    # pydicom only warns, and drops the data set: the check after reading catches it.
    with (
        pytest.warns(UserWarning, match="End of file"),
        pytest.raises(UndecodablePixels) as caught,
    ):
        read_dicom_file(path)
    assert "no data set" in caught.value.detail


def test_file_truncated_in_the_header(tmp_path: Path) -> None:
    data = encoded(make_dataset(grey8()))
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:100])
    with pytest.raises(UndecodablePixels):
        read_dicom_file(path)
