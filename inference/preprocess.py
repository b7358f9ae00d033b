"""Pixels to model input: the one function training and inference share.

The path from a file (PNG, JPEG or DICOM) to the tensor the network sees has three steps:

1. `read_pixels`: decode to float32 in [0, 1], MONOCHROME2 convention (bright = dense),
   grey (H, W) or RGB (H, W, 3). DICOM goes through `inference.dicom_pixels`
   (modality LUT, VOI LUT / window, MONOCHROME1 inversion, compressed syntaxes).
2. `to_uint8_rgb`: intensity normalisation (`PreprocessSpec.intensity`) to an 8-bit RGB
   image. Training's fastai pipeline starts from exactly this image.
3. `model_tensor`: the geometry fastai applies to a *validation* image, reproduced without
   fastai: `Resize(resize)` (centre crop or pad, PIL bilinear), then the validation branch
   of `RandomResizedCropGPU(size)` (area pre-shrink + bilinear `grid_sample`, reflection
   padding, align_corners=True), then normalisation with the card's mean and std.

`tests/unit/test_preprocess_parity.py` checks step 3 against fastai's own validation
DataLoader to 1e-5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from inference.errors import ImageTooSmall, InvalidInput, UndecodablePixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIDE = 32
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
INTENSITY_METHODS = ("none", "percentile")
RESIZE_METHODS = ("crop", "pad")


@dataclass(frozen=True)
class PreprocessSpec:
    """What inference must do to an image to match training; stored in the model card."""

    intensity: str = "none"  # "none": values as decoded (the seed); "percentile": p1..p99 stretch
    resize: int = 460  # fastai Resize item transform, square
    resize_method: str = "crop"  # "crop" (centre crop, the seed) or "pad" (zero padding)
    size: int = 224  # network input, square
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    percentiles: tuple[float, float] = field(default=(1.0, 99.0))
    trim_borders: bool = False  # drop flat collimation/letterbox borders before geometry
    # Shorter side of the network's region reduced to at most this many pixels (area
    # resampling) before the geometry, so that a 2000-pixel DICOM, a 512-pixel PNG and a
    # 180-pixel thumbnail all reach the network with the same level of detail; 0: off.
    detail_side: int = 0

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_METHODS:
            raise ValueError(f"intensity {self.intensity!r} not one of {INTENSITY_METHODS}")
        if self.resize_method not in RESIZE_METHODS:
            raise ValueError(f"resize_method {self.resize_method!r} not one of {RESIZE_METHODS}")
        if self.detail_side and self.detail_side < MIN_SIDE:
            raise ValueError(f"detail_side {self.detail_side} below {MIN_SIDE} (0 turns it off)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreprocessSpec:
        values = dict(data)
        for key in ("mean", "std", "percentiles"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICM preamble marker, or a .dcm suffix."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_raster(path: Path) -> np.ndarray:
    """PNG/JPEG/TIFF to float32 in [0, 1]: grey (H, W) or RGB (H, W, 3)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float32)
                maximum = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
                pixels = array / maximum
            elif image.mode in ("L", "1", "P", "LA"):
                pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
            else:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UndecodablePixels(f"{path}: {error}") from error
    return _check_size(pixels)


def read_pixels(source: Path | Any) -> np.ndarray:
    """A file path (raster or DICOM) or a pydicom Dataset to float32 pixels in [0, 1]."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix.lower() in RASTER_SUFFIXES and not is_dicom_file(path):
            return read_raster(path)
        from inference.dicom_pixels import read_dicom_file

        return _check_size(read_dicom_file(path))
    from inference.dicom_pixels import dataset_pixels

    return _check_size(dataset_pixels(source))


def _check_size(pixels: np.ndarray) -> np.ndarray:
    rows, columns = pixels.shape[:2]
    if rows < MIN_SIDE or columns < MIN_SIDE:
        raise ImageTooSmall(rows, columns, MIN_SIDE)
    return pixels


def to_uint8_rgb(
    pixels: np.ndarray, spec: PreprocessSpec, region: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Intensity normalisation to 8-bit RGB (H, W, 3): the image training starts from.

    With `intensity="percentile"` the window comes from `region` (left, top, right, bottom),
    the anatomy without its borders, when given.
    """
    grey = pixels if pixels.ndim == 2 else pixels.mean(axis=2)
    if spec.intensity == "percentile":
        left, top, right, bottom = region or (0, 0, grey.shape[1], grey.shape[0])
        low, high = np.percentile(grey[top:bottom, left:right], spec.percentiles)
        if high - low < 1e-6:
            low, high = float(grey.min()), float(grey.max())
        scale = 1.0 / max(high - low, 1e-6)
        stretched = np.clip((grey - low) * scale, 0.0, 1.0)
        channels = np.repeat(stretched[..., None], 3, axis=2)
    elif pixels.ndim == 2:
        channels = np.repeat(pixels[..., None], 3, axis=2)
    else:
        channels = pixels
    if not np.all(np.isfinite(channels)):
        raise InvalidInput("pixel values not finite")
    return np.round(np.clip(channels, 0.0, 1.0) * 255.0).astype(np.uint8)


FLAT_STD = 0.03  # a row/column this uniform (in [0, 1] units) is border, not anatomy
MAX_TRIM = 0.3  # never trim more than this fraction from one side


def _flat_run(std: np.ndarray, limit: int) -> int:
    run = 0
    while run < limit and std[run] < FLAT_STD:
        run += 1
    return run


def content_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """The image without flat borders (collimation, letterboxing): (left, top, right, bottom).

    Rows and columns whose standard deviation is below FLAT_STD are trimmed from each edge,
    at most MAX_TRIM of the side; statistics come from a copy at most 512 pixels wide.
    """
    grey = pixels if pixels.ndim == 2 else pixels.mean(axis=2)
    height, width = grey.shape
    step = max(1, max(height, width) // 512)
    small = grey[::step, ::step]
    row_std, col_std = small.std(axis=1), small.std(axis=0)
    rows, cols = len(row_std), len(col_std)
    top = _flat_run(row_std, int(rows * MAX_TRIM))
    bottom = _flat_run(row_std[::-1], int(rows * MAX_TRIM))
    left = _flat_run(col_std, int(cols * MAX_TRIM))
    right = _flat_run(col_std[::-1], int(cols * MAX_TRIM))
    box = (left * step, top * step, width - right * step, height - bottom * step)
    if box[2] - box[0] < MIN_SIDE or box[3] - box[1] < MIN_SIDE:
        return (0, 0, width, height)
    return box


def network_image(
    pixels: np.ndarray, spec: PreprocessSpec
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The whole image as 8-bit RGB (for display) and the region the network is given."""
    height, width = pixels.shape[:2]
    region = content_box(pixels) if spec.trim_borders else (0, 0, width, height)
    return to_uint8_rgb(pixels, spec, region), region


def limit_detail(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The region with its shorter side reduced to `spec.detail_side` (area resampling).

    The sample chest PNGs are all 512 pixels and many abdominal ones are small thumbnails:
    without this step sharpness alone tells the classes apart, and a real radiograph of
    2000+ pixels is sharper than anything seen in training. Images already at or below the
    limit are returned unchanged.
    """
    height, width = rgb.shape[:2]
    if not spec.detail_side or min(height, width) <= spec.detail_side:
        return rgb
    scale = spec.detail_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    reduced = Image.fromarray(rgb, mode="RGB").resize(size, Image.Resampling.BOX)
    return np.asarray(reduced, dtype=np.uint8)


def training_image(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """What training feeds fastai: the network's region of `network_image`, detail limited."""
    display, (left, top, right, bottom) = network_image(pixels, spec)
    return limit_detail(np.ascontiguousarray(display[top:bottom, left:right]), spec)


def resize_item(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """fastai `Resize(spec.resize, method)` on a validation image (centre), PIL bilinear."""
    width, height = image.size
    target = spec.resize
    if spec.resize_method == "crop":
        scale = min(width / target, height / target)
    else:
        scale = max(width / target, height / target)
    crop_w, crop_h = int(scale * target), int(scale * target)
    left, top = int(0.5 * (width - crop_w)), int(0.5 * (height - crop_h))
    if left >= 0 and top >= 0:
        image = image.crop((left, top, left + crop_w, top + crop_h))
    else:
        # Some side is smaller than the square: crop what is inside, pad the rest with zeros.
        inside = image.crop(
            (max(left, 0), max(top, 0), min(left + crop_w, width), min(top + crop_h, height))
        )
        canvas = Image.new(image.mode, (crop_w, crop_h))
        canvas.paste(inside, (max(-left, 0), max(-top, 0)))
        image = canvas
    return image.resize((target, target), Image.Resampling.BILINEAR)


def _grid_resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    """fastai's `affine_coord(sz=size)` with an identity matrix, bilinear (the valid branch)."""
    theta = torch.eye(3, device=batch.device, dtype=batch.dtype)[:2].expand(batch.shape[0], 2, 3)
    coords = F.affine_grid(theta, [batch.shape[0], batch.shape[1], size, size], align_corners=True)
    shrink = min(batch.shape[-2] / size, batch.shape[-1] / size) / 2
    zoom = 1 / (coords.max() - coords.min()).item() * 2
    if shrink > 1 and shrink > zoom:
        batch = F.interpolate(
            batch, scale_factor=1 / shrink, mode="area", recompute_scale_factor=True
        )
    return F.grid_sample(
        batch, coords, mode="bilinear", padding_mode="reflection", align_corners=True
    )


def normalize(batch: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std


def model_tensor(rgb: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """8-bit RGB (H, W, 3) to the normalised (3, size, size) float tensor the network sees."""
    resized = resize_item(Image.fromarray(rgb, mode="RGB"), spec)
    batch = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
    batch = batch.permute(2, 0, 1).unsqueeze(0).float() / 255.0
    return normalize(_grid_resize(batch, spec.size), spec)[0]


@dataclass
class Prepared:
    """One image ready for the network, with what the outputs need to draw on it."""

    tensor: torch.Tensor  # (3, size, size), normalised
    display: np.ndarray  # uint8 RGB (H, W, 3), original resolution, after intensity step
    box: tuple[int, int, int, int]  # the square of `display` the network saw (may overhang)


def prepare(source: Path | Any, spec: PreprocessSpec) -> Prepared:
    """A file or pydicom Dataset all the way to model input. Raises `InvalidInput`."""
    display, (left, top, right, bottom) = network_image(read_pixels(source), spec)
    region = limit_detail(np.ascontiguousarray(display[top:bottom, left:right]), spec)
    square = crop_box(right - left, bottom - top, spec)
    box = (square[0] + left, square[1] + top, square[2] + left, square[3] + top)
    return Prepared(tensor=model_tensor(region, spec), display=display, box=box)


def crop_box(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """The region of the original image the network saw (left, top, right, bottom)."""
    if spec.resize_method == "crop":
        side = int(min(width / spec.resize, height / spec.resize) * spec.resize)
    else:
        side = int(max(width / spec.resize, height / spec.resize) * spec.resize)
    left, top = int(0.5 * (width - side)), int(0.5 * (height - side))
    return left, top, left + side, top + side
