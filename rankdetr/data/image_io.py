"""Reading image files for training and evaluation.

:func:`read_image` returns an (H, W, 3) uint8 array in RGB or BGR whatever the file holds:
grayscale, palette, CMYK and 16-bit files are converted to 3 channels, RGBA and LA lose their
alpha, and the EXIF orientation is applied (as detectron2's reader does, so that the size agrees
with what COCO tools record). A missing or unreadable file raises an error that names the file
and the dataset entry it belongs to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rankdetr.errors import UserError

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "ImageReadError", "read_image"]

# Pillow's own limit (about 89.5 M pixels, ~0.27 GB as RGB): images above the limit are refused
# before their pixels are decoded (a 10000x10000 PNG would cost about 2.5 GB while decoding).
# The mappers take another limit as `max_image_pixels` (dataloader.*.mapper.max_image_pixels).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

IMAGE_FORMATS = ("RGB", "BGR")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


class ImageReadError(OSError, UserError):
    """An image file that exists but cannot be decoded; the message names the file."""


def read_image(
    file_name: str | Path,
    format: str = "RGB",
    entry: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 array.

    Args:
        file_name: path of the image.
        format: "RGB" or "BGR" channel order of the result.
        entry: what the file belongs to, for error messages (e.g. "image_id 42 of
            shapes_train"); None names the file only.
        max_pixels: an image with more pixels (width x height, read from its header) is refused
            before decoding; None for no limit.

    Returns:
        (H, W, 3) uint8 array, C-contiguous.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file exists but is not a readable image (truncated, not an image),
            or it has more than `max_pixels` pixels.
        ValueError: `format` is not "RGB" or "BGR".
    """
    if format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be 'RGB' or 'BGR', got {format!r}")
    where = f" ({entry})" if entry else ""
    path = Path(file_name)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}{where}")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our limit below replaces Pillow's warning / bomb error
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageReadError(
                    f"image {path}{where} is {width}x{height} = {width * height} pixels, above "
                    f"the limit of {max_pixels} (raise dataloader.*.mapper.max_image_pixels to "
                    "read it)"
                )
            image = ImageOps.exif_transpose(image)
            array = _to_rgb_array(image)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as error:
        # PIL reports truncated or corrupt data as OSError / SyntaxError / ValueError.
        raise ImageReadError(f"cannot read image {path}{where}: {error}") from error
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    if format == "BGR":
        array = array[:, :, ::-1]
    return np.ascontiguousarray(array)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W, 3) uint8 RGB; decodes the pixel data."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("RGB") would clip 16-bit values at 255; keep the top 8 bits instead.
        gray = (np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # then drop alpha: the pixels' colour, not a blend
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
