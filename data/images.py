"""Safe image loading: every file becomes an upright RGB `PIL.Image`, or a clear `ImageLoadError`.

Annotation files name images by relative path; `resolve_image_path` keeps those paths inside the image
root, and `check_images_exist` turns missing files into one clear error, or, on request, into a counted and
reported skip.
"""

import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Larger images are refused as possible decompression bombs (Pillow's own limit is ~89 Mpx, warning only).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


class ImageLoadError(OSError):
    """An image file that cannot be read, is corrupt or truncated, or is too large."""


class UnsafePathError(ValueError):
    """An image path from an annotation file that would leave the image root."""


def resolve_image_path(root, relpath) -> Path:
    """`root / relpath`, refusing absolute paths and `..` components that would escape `root`."""
    text = str(relpath)
    if not text:
        raise UnsafePathError("empty image path")
    if os.path.isabs(text) or text.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", text):  # POSIX, UNC or drive
        raise UnsafePathError(f"absolute image path {text!r} refused: paths must be relative to the image root {root}")
    if ".." in Path(text.replace("\\", "/")).parts:
        raise UnsafePathError(f"image path {text!r} refused: '..' would leave the image root {root}")
    return Path(root) / text


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white, 16-bit greys are rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        # I;16* is 16-bit; 32-bit "I" images almost always hold 16-bit data too, unless all values fit 8 bits
        top = 65535.0 if image.mode != "I" or values.max() > 255 else 255.0
        grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        grey = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "RGBa", "PA") or (image.mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def load_image(path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as an upright RGB image (EXIF orientation applied).

    Raises `ImageLoadError` naming the file when it is missing, not an image, truncated or corrupt, or has
    more than `max_pixels` pixels (checked from the header, before decoding).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageLoadError(
                    f"{path}: {image.width}x{image.height} image has more than {max_pixels} pixels "
                    "(possible decompression bomb); raise max_pixels to load it"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"cannot read image {path}: {error}") from None


def check_images_exist(records, image_paths, skip_missing: bool, source) -> tuple[list, int]:
    """Keep the records whose images all exist.

    `image_paths(record)` lists a record's image paths. Missing files raise `FileNotFoundError` (naming the
    first one and the count) unless `skip_missing`, in which case the records are dropped and the count is
    reported with a warning, never silently.
    """
    kept, missing = [], []
    for record in records:
        absent = [path for path in image_paths(record) if not Path(path).is_file()]
        if absent:
            missing.append(absent[0])
        else:
            kept.append(record)
    if missing and not skip_missing:
        raise FileNotFoundError(
            f"{source}: {len(missing)} sample(s) have missing image files, first: {missing[0]} "
            "(pass skip_missing=True to skip them)"
        )
    if missing:
        warnings.warn(f"{source}: skipped {len(missing)} of {len(records)} samples with missing images "
                      f"(first: {missing[0]})", stacklevel=3)
    return kept, len(missing)
