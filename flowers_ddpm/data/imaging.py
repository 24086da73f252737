"""Turn one raw image record into a training-resolution uint8 array. Pure Pillow + numpy (thread-safe).

Pillow releases the GIL while decoding and resizing, so these functions scale across decode threads.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

# Images over Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) are skipped by `check_pixel_count`;
# Pillow's own warning for sizes between 1x and 2x the limit would only repeat that.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class TransformSettings:
    """Resize the short side to `resolution`, crop square (center or random), optionally flip."""

    resolution: int
    center_crop: bool
    random_flip: bool
    # PIL draft mode: decode JPEGs at a reduced DCT scale when the source is much larger than `resolution`. Off
    # only in the benchmark's baseline, which decodes at full size as diffusers' example does.
    jpeg_draft: bool = True


def open_image(record) -> Image.Image:
    """Open a datasets image record ({'bytes', 'path'}), a path, or a PIL image."""
    if isinstance(record, Image.Image):
        return record
    if isinstance(record, str):
        return Image.open(record)
    if isinstance(record, bytes):
        return Image.open(io.BytesIO(record))
    if record.get("bytes") is not None:
        return Image.open(io.BytesIO(record["bytes"]))
    return Image.open(record["path"])


def check_pixel_count(image: Image.Image) -> None:
    """Refuse images over Pillow's decompression-bomb limit before decoding them (Pillow itself only refuses
    images over twice the limit and warns below that)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise Image.DecompressionBombError(
            f"{image.width}x{image.height} pixels is over the decompression-bomb limit of {limit} pixels")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode (L, LA, RGBA, P, CMYK, I;16, I, F) to 8-bit RGB; transparency is composited on white.

    Images of more than 8 bits per value are converted by their real range: values above 255 mean a 16-bit range
    (divided by 257), values that all fit in 0-255 (8-bit data stored in a 16-bit file) are kept as they are."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def decode_and_transform(record, settings: TransformSettings, rng: np.random.Generator) -> np.ndarray:
    """Decode, convert to RGB, resize the short side, crop and flip: returns HxWx3 uint8.

    `rng` supplies the crop offset and flip so augmentation is a pure function of the example's key.
    """
    return crop_and_flip(decode_resized(record, settings), settings, rng)


def decode_resized(record, settings: TransformSettings) -> np.ndarray:
    """The deterministic part of `decode_and_transform` (what the decode-once cache stores): decode, RGB, resize
    the short side to the resolution, and center-crop when `settings.center_crop`. Returns HxWx3 uint8."""
    size = settings.resolution
    with open_image(record) as image:
        check_pixel_count(image)
        if image.format == "JPEG" and settings.jpeg_draft:
            image.draft("RGB", (size, size))  # decode at reduced scale when the source is much larger
        image = to_rgb(ImageOps.exif_transpose(image))
        image.load()
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
    if settings.center_crop:
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def crop_and_flip(array: np.ndarray, settings: TransformSettings, rng: np.random.Generator) -> np.ndarray:
    """The random part of `decode_and_transform`: a random square crop (unless already center-cropped) and an
    optional horizontal flip of a `decode_resized` array, drawn from `rng` in a fixed order."""
    return np.ascontiguousarray(crop_and_flip_view(array, settings, rng))


def crop_and_flip_view(array: np.ndarray, settings: TransformSettings, rng: np.random.Generator) -> np.ndarray:
    """`crop_and_flip` as a view of `array` (no copy)."""
    size = settings.resolution
    new_h, new_w = array.shape[:2]
    if not settings.center_crop:
        left, top = int(rng.integers(0, new_w - size + 1)), int(rng.integers(0, new_h - size + 1))
        array = array[top:top + size, left:left + size]
    if settings.random_flip and rng.random() < 0.5:
        array = array[:, ::-1]
    return array


def try_decode(record, settings: TransformSettings, seed: tuple) -> tuple[Optional[np.ndarray], Optional[str]]:
    """decode_and_transform that returns (None, reason) for unreadable or truncated files instead of raising."""
    try:
        return decode_and_transform(record, settings, np.random.default_rng(seed)), None
    except Exception as e:  # any decoder error means "skip this file"; Pillow raises many types
        return None, f"{type(e).__name__}: {e}"
