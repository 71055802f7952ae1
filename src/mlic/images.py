"""Load an image as users' folders hold them and turn it into the model's square RGB input.

No TensorFlow here: preprocess runs this in worker processes, which then start in a fraction
of a second instead of paying TensorFlow's import.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps

ResizeMode = Literal["squash", "pad", "crop"]
RESIZE_MODES: tuple[str, ...] = ("squash", "pad", "crop")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image, apply its EXIF orientation and convert it to 8-bit RGB.

    Grayscale, palette, CMYK and 16-bit images become RGB; transparency is composited onto
    black so padded borders and transparent areas look the same to the model.
    """
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)  # phones store rotated pixels plus a tag
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            background = Image.new("RGB", rgba.size, (0, 0, 0))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale: PIL's convert("RGB") would clip, so scale to 8 bits first.
            im = im.point(lambda v: v / 256).convert("L")
        return im.convert("RGB")


def resize(im: Image.Image, size: int, mode: ResizeMode) -> Image.Image:
    """Resize to `size` x `size`.

    squash: stretch to square (keeps all content, distorts shapes);
    pad: keep the aspect ratio and pad with black (keeps content and shapes);
    crop: keep the aspect ratio, scale the short side to `size` and centre-crop (loses edges).
    """
    if mode == "squash":
        return im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if mode == "pad":
        return ImageOps.pad(im, (size, size), method=Image.Resampling.BILINEAR, color=(0, 0, 0))
    if mode == "crop":
        return ImageOps.fit(im, (size, size), method=Image.Resampling.BILINEAR)
    raise ValueError(f"unknown resize mode {mode!r}; use one of {', '.join(RESIZE_MODES)}")


def encode(im: Image.Image, encoding: Literal["jpeg", "png"], quality: int = 92) -> bytes:
    """Encode an RGB image to JPEG or PNG bytes (deterministic for the same pixels)."""
    buf = io.BytesIO()
    if encoding == "jpeg":
        # Full-resolution colour (4:4:4): at 32-96 px, 4:2:0 chroma subsampling doubles the
        # round-trip error (mean ~2.8 -> ~1.2 levels) for ~11% more bytes.
        im.save(buf, format="JPEG", quality=quality, optimize=False, subsampling=0)
    elif encoding == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; use jpeg or png")
    return buf.getvalue()


def prepare(path: str | Path, size: int, mode: ResizeMode, encoding: Literal["jpeg", "png"],
            quality: int = 92) -> bytes:
    """Load, orient, convert, resize and encode one image file: the unit of work of preprocess."""
    return encode(resize(load_rgb(path), size, mode), encoding, quality)
