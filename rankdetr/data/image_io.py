"""Reading image files for training and evaluation.

:func:`read_image` returns an (H, W, 3) uint8 array in RGB or BGR whatever the file holds:
grayscale, palette, CMYK and 16-bit files are converted to 3 channels, RGBA and LA lose their
alpha, and the EXIF orientation is applied (as detectron2's reader does, so that the size agrees
with what COCO tools record). A missing or unreadable file raises an error that names the file
and the dataset entry it belongs to. :func:`check_decoded_size` compares the decoded size with the
dataset's, naming the file, both sizes and the EXIF orientation when they differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from detectron2.data.detection_utils import SizeMismatchError
from PIL import Image, ImageOps, UnidentifiedImageError

from rankdetr.errors import UserError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageReadError",
    "ImageSizeError",
    "check_decoded_size",
    "exif_orientation",
    "read_image",
]

# Pillow's own limit (about 89.5 M pixels, ~0.27 GB as RGB): images above the limit are refused
# before their pixels are decoded (a 10000x10000 PNG would cost about 2.5 GB while decoding).
# The mappers take another limit as `max_image_pixels` (dataloader.*.mapper.max_image_pixels).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

IMAGE_FORMATS = ("RGB", "BGR")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
_EXIF_ORIENTATION_TAG = 0x0112
# What each EXIF orientation asks a viewer to do with the stored pixels (5 to 8 swap the sides).
_ORIENTATIONS = {
    1: "none",
    2: "mirror",
    3: "rotate 180 degrees",
    4: "flip vertically",
    5: "mirror and rotate 90 degrees",
    6: "rotate 90 degrees clockwise",
    7: "mirror and rotate 270 degrees",
    8: "rotate 90 degrees counter-clockwise",
}
_SWAPS_SIDES = (5, 6, 7, 8)


class ImageReadError(OSError, UserError):
    """An image file that exists but cannot be decoded; the message names the file."""


class ImageSizeError(SizeMismatchError, UserError):
    """A decoded image whose size is not the dataset's; names the file, both sizes and the EXIF
    orientation (a detectron2 SizeMismatchError, so code that catches that still does)."""


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


def exif_orientation(file_name: str | Path) -> int | None:
    """The EXIF orientation tag of an image file (1 to 8), or None when it has none or cannot be
    read."""
    try:
        with Image.open(file_name) as image:
            value = image.getexif().get(_EXIF_ORIENTATION_TAG)
    except (OSError, SyntaxError, ValueError):
        return None
    return value if isinstance(value, int) else None


def check_decoded_size(dataset_dict: dict, image: np.ndarray, entry: str | None = None) -> None:
    """Refuse an image (as :func:`read_image` decoded it) whose size is not the dataset dict's
    width x height; a dict without a size is not checked.

    The usual cause is a rotated camera JPEG: the reader applies the EXIF orientation, as COCO
    tools do when they record the size, but some tools write the stored (unrotated) size. The
    message names the file, both sizes and the orientation.

    Raises:
        ImageSizeError: the sizes differ.
    """
    if "width" not in dataset_dict and "height" not in dataset_dict:
        return
    decoded = (image.shape[1], image.shape[0])
    expected = (dataset_dict.get("width"), dataset_dict.get("height"))
    if decoded == expected:
        return
    file_name = dataset_dict.get("file_name", "?")
    where = f" ({entry})" if entry else ""
    raise ImageSizeError(
        # detectron2's opening words, which users and tests search for, then what it lacks.
        f"Mismatched image shape for image {file_name}{where}: the dataset gives its size as "
        f"{_size(expected)} (width x height), but the image decodes to {_size(decoded)}; "
        f"{_orientation_hint(file_name, decoded, expected)}"
    )


def _size(width_height: tuple) -> str:
    return f"{width_height[0]}x{width_height[1]}"


def _orientation_hint(file_name, decoded: tuple[int, int], expected: tuple) -> str:
    """What the EXIF orientation explains of a size mismatch, and how to fix the JSON."""
    orientation = exif_orientation(file_name)
    fix = f"set width={decoded[0]}, height={decoded[1]} in the annotation file"
    if orientation is None:
        return f"the file has no EXIF orientation: {fix}"
    applied = f"EXIF orientation {orientation} ({_ORIENTATIONS.get(orientation, 'unknown')})"
    stored = decoded[::-1] if orientation in _SWAPS_SIDES else decoded
    if tuple(expected) == stored:
        return (
            f"that is the file's stored size, before its {applied} is applied (COCO tools "
            f"record the size as displayed): {fix}, or remove the orientation from the file"
        )
    return f"the decoded size includes its {applied}: {fix}"
