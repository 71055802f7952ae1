"""Load an image as users' folders hold them and turn it into the model's square RGB input.

No TensorFlow here: preprocess runs this in worker processes, which then start in a fraction
of a second instead of paying TensorFlow's import.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlic.errors import UserError

ResizeMode = Literal["squash", "pad", "crop"]
RESIZE_MODES: tuple[str, ...] = ("squash", "pad", "crop")

# Where an image comes from: a file path, the file's bytes (an upload, a base64 payload decoded)
# or an open binary file. Every source goes through the same decoding.
ImageSource = Union[str, Path, bytes, bytearray, IO[bytes]]


class ImageError(UserError):
    """An image file the pipeline was told to use cannot be used; the message names it and the fix."""


class TooManyPixels(ValueError):
    """The header claims more pixels than allowed: a decompression bomb, or a scan too big to decode."""

    def __init__(self, width: int, height: int, limit: int):
        self.width, self.height, self.limit = width, height, limit
        super().__init__(f"{width}x{height} = {width * height:,} pixels, more than the limit of {limit:,}")


@contextlib.contextmanager
def _pil_limit(limit: int | None) -> Iterator[None]:
    """PIL's decompression-bomb limit set to `limit` (None: off) for one image, then restored.

    PIL raises only above twice its limit (a warning above once), and its message does not give
    the size, so `load_rgb` checks the header against `max_pixels` itself, with PIL's check off
    during `open`; PIL's own checks elsewhere (GIF frames, ICO entries) then back it up at the same
    limit. Scoped because PIL's limit is a module global: only code that decodes one image at a
    time per process (split's check, preprocess's workers) passes a limit, never the threaded
    prediction path, which keeps PIL's default.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check raises
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_rgb(source: ImageSource, max_pixels: int | None = None) -> Image.Image:
    """Open an image, apply its EXIF orientation and convert it to 8-bit RGB.

    `source` is a path, the file's bytes, or a binary file object. Grayscale, palette, CMYK and
    16-bit images become RGB; transparency is composited onto black so padded borders and
    transparent areas look the same to the model. With `max_pixels` (`data.max_image_pixels`),
    an image whose header claims more pixels raises `TooManyPixels` before any pixel is decoded.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    if max_pixels is None:
        with Image.open(source) as im:
            return _to_rgb(im)
    with _pil_limit(None):
        im = Image.open(source)  # reads the header only
    with im, _pil_limit(max_pixels):
        if im.width * im.height > max_pixels:
            raise TooManyPixels(im.width, im.height, max_pixels)
        return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
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


def describe_failure(exc: BaseException) -> str:
    """One line saying why an image could not be used, without PIL's object reprs."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file that can be read (JPEG, PNG, GIF, BMP, TIFF, WebP)"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, (TooManyPixels, Image.DecompressionBombError)):
        return f"too many pixels ({exc}): a decompression bomb, or an image too large to decode"
    return f"{exc.__class__.__name__}: {exc}"


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


def to_model_input(source: ImageSource, size: int, mode: ResizeMode, max_pixels: int | None = None) -> Image.Image:
    """THE definition of "image file -> model input": decode, orient, convert to RGB, resize.

    `preprocess` (through `prepare`) and every prediction path (`mlic predict`, the packaged
    MLflow model, the served model) call this one function with the size and resize mode the
    model was trained with (model_meta.json), so training and serving cannot drift apart.
    `max_pixels` (preprocess passes `data.max_image_pixels`) is checked before decoding.
    """
    return resize(load_rgb(source, max_pixels), size, mode)


def to_array(source: ImageSource, size: int, mode: ResizeMode) -> np.ndarray:
    """`to_model_input` as the model's pixel array: uint8, shape (size, size, 3), RGB."""
    return np.asarray(to_model_input(source, size, mode), dtype=np.uint8)


def prepare(path: ImageSource, size: int, mode: ResizeMode, encoding: Literal["jpeg", "png"],
            quality: int = 92, max_pixels: int | None = None) -> bytes:
    """Load, orient, convert, resize and encode one image file: the unit of work of preprocess."""
    return encode(to_model_input(path, size, mode, max_pixels), encoding, quality)
