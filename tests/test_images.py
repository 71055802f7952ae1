"""Tests for image loading, resizing and encoding (`mlic.images`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from mlic import images
from mlic.images import encode, load_rgb, prepare, resize

EXIF_ORIENTATION = 0x0112
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def _quadrants(width: int = 48, height: int = 24) -> Image.Image:
    """Upright reference: red top-left, green top-right, blue bottom-left, white bottom-right."""
    im = Image.new("RGB", (width, height), WHITE)
    im.paste(RED, (0, 0, width // 2, height // 2))
    im.paste(GREEN, (width // 2, 0, width, height // 2))
    im.paste(BLUE, (0, height // 2, width // 2, height))
    return im


def _quadrant_colours(im: Image.Image) -> list[tuple[int, ...]]:
    a = np.asarray(im)
    h, w = a.shape[:2]
    return [tuple(int(v) for v in a[y, x]) for y, x in ((h // 4, w // 4), (h // 4, 3 * w // 4),
                                                        (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4))]


def _close(got: tuple[int, ...], want: tuple[int, ...], tol: int = 24) -> bool:
    return all(abs(int(g) - int(w)) <= tol for g, w in zip(got, want))


# --- EXIF orientation -----------------------------------------------------------------------

# How a camera stores the pixels for each EXIF orientation, given the upright picture.
STORED = {
    1: lambda im: im,
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_90),   # phone held upright: stored turned left
    8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
}


@pytest.mark.parametrize("orientation", sorted(STORED))
@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, ext: str) -> None:
    upright = _quadrants()
    stored = STORED[orientation](upright)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path = tmp_path / f"phone.{ext}"
    stored.save(path, exif=exif, **({"quality": 95} if ext == "jpg" else {}))
    if orientation != 1:
        assert stored.size != upright.size or _quadrant_colours(stored) != _quadrant_colours(upright)

    got = load_rgb(path)
    assert got.size == upright.size == (48, 24)
    for g, w in zip(_quadrant_colours(got), _quadrant_colours(upright)):
        assert _close(g, w), (orientation, _quadrant_colours(got))


# --- colour modes ---------------------------------------------------------------------------


def _palette_image(transparent: bool) -> Image.Image:
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 200, 100, 50, 10, 20, 30] + [0] * (256 * 3 - 9))
    im.paste(2, (0, 0, 4, 8))  # left half index 2, right half index 1
    if transparent:
        im.info["transparency"] = 2
    return im


def _rgba() -> Image.Image:
    im = Image.new("RGBA", (8, 8), (200, 100, 50, 255))
    im.paste((10, 20, 30, 0), (0, 0, 4, 8))  # transparent left half
    return im


def _la() -> Image.Image:
    im = Image.new("LA", (8, 8), (120, 255))
    im.paste((90, 0), (0, 0, 4, 8))
    return im


def _i16() -> Image.Image:
    im = Image.new("I;16", (8, 8))
    im.putdata([0] * 32 + [32768] * 32)  # top half 0, bottom half half-scale
    return im


def _cmyk() -> Image.Image:
    im = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    im.paste((255, 255, 255, 255), (0, 0, 4, 8))  # all ink: black
    return im


# (name, how to build it, file extension, expected colour at left-centre, at right-centre)
MODE_CASES = [
    ("L", lambda: Image.new("L", (8, 8), 100), "png", (100, 100, 100), (100, 100, 100)),
    ("1", lambda: Image.new("1", (8, 8), 1), "png", WHITE, WHITE),
    ("LA", _la, "png", BLACK, (120, 120, 120)),
    ("RGBA", _rgba, "png", BLACK, (200, 100, 50)),
    ("P", lambda: _palette_image(False), "png", (10, 20, 30), (200, 100, 50)),
    ("P-transparent", lambda: _palette_image(True), "png", BLACK, (200, 100, 50)),
    ("P-transparent-gif", lambda: _palette_image(True), "gif", BLACK, (200, 100, 50)),
    ("CMYK", _cmyk, "jpg", BLACK, WHITE),
    ("CMYK-tiff", _cmyk, "tif", BLACK, WHITE),
    ("I;16", _i16, "png", BLACK, BLACK),  # top row checked separately below
    ("I;16-tiff", _i16, "tif", BLACK, BLACK),
    ("RGB", lambda: Image.new("RGB", (8, 8), (1, 2, 3)), "png", (1, 2, 3), (1, 2, 3)),
]


@pytest.mark.parametrize("name, build, ext, left, right", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_mode_comes_back_as_rgb_uint8(tmp_path: Path, name, build, ext, left, right) -> None:
    path = tmp_path / f"img.{ext}"
    build().save(path)
    im = load_rgb(path)
    a = np.asarray(im)
    assert im.mode == "RGB" and a.dtype == np.uint8 and a.shape == (8, 8, 3)
    tol = 12 if ext == "jpg" else 0
    assert _close(tuple(a[2, 1]), left, tol), tuple(a[2, 1])
    assert _close(tuple(a[2, 6]), right, tol), tuple(a[2, 6])


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"deep.{ext}"
    im = Image.new("I;16", (4, 1))
    im.putdata([0, 256, 32768, 65535])
    im.save(path)
    a = np.asarray(load_rgb(path))
    assert a[0, :, 0].tolist() == [0, 1, 128, 255]  # convert("RGB") alone would clip 256.. to 255
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_load_rgb_does_not_keep_the_file_open(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)
    im = load_rgb(path)
    path.unlink()  # the pixels were read inside the `with`
    assert np.asarray(im).shape == (4, 4, 3)


@pytest.mark.parametrize(
    "content, error",
    [(b"not an image at all", UnidentifiedImageError), (None, OSError)],
    ids=["text", "truncated-jpeg"],
)
def test_unreadable_files_raise(tmp_path: Path, content: bytes | None, error: type) -> None:
    path = tmp_path / "bad.jpg"
    if content is None:
        buf = io.BytesIO()
        _quadrants(64, 64).save(buf, format="JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(error):
        prepare(path, 16, "pad", "jpeg")


# --- resize ---------------------------------------------------------------------------------


def _wide() -> Image.Image:
    """80x40: green 8-px strips at the left and right edges, red in between."""
    im = Image.new("RGB", (80, 40), RED)
    im.paste(GREEN, (0, 0, 8, 40))
    im.paste(GREEN, (72, 0, 80, 40))
    return im


def _has(a: np.ndarray, colour: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    return (np.abs(a.astype(int) - colour) <= tol).all(axis=-1)


@pytest.mark.parametrize("mode", images.RESIZE_MODES)
@pytest.mark.parametrize("source", [(80, 40), (40, 80), (33, 33), (8, 5), (200, 31)])
@pytest.mark.parametrize("size", [32, 17])
def test_every_mode_gives_a_square_of_the_requested_size(mode: str, source: tuple[int, int], size: int) -> None:
    out = resize(Image.new("RGB", source, RED), size, mode)
    assert out.size == (size, size) and out.mode == "RGB"


def test_pad_keeps_aspect_with_black_borders_on_a_wide_image() -> None:
    a = np.asarray(resize(_wide(), 32, "pad"))
    assert _has(a[:7], BLACK, 0).all() and _has(a[-7:], BLACK, 0).all()  # 8 black rows above and below
    middle = a[10:22]
    assert not _has(middle, BLACK).any()
    assert _has(middle[:, :2], GREEN).all() and _has(middle[:, -2:], GREEN).all()  # edges kept
    assert _has(middle[:, 8:24], RED).all()


def test_pad_puts_black_borders_left_and_right_on_a_tall_image() -> None:
    a = np.asarray(resize(_wide().transpose(Image.Transpose.ROTATE_90), 32, "pad"))
    assert _has(a[:, :7], BLACK, 0).all() and _has(a[:, -7:], BLACK, 0).all()
    assert not _has(a[:, 10:22], BLACK).any()


def test_crop_removes_the_edges_and_keeps_the_centre() -> None:
    a = np.asarray(resize(_wide(), 32, "crop"))
    assert not _has(a, GREEN).any()  # the 8-px strips were outside the central 40x40
    assert not _has(a, BLACK).any()
    assert _has(a, RED).all()


def test_squash_stretches_everything_into_the_square() -> None:
    a = np.asarray(resize(_wide(), 32, "squash"))
    assert not _has(a, BLACK).any()
    # every row keeps both green strips, squeezed from 8/80 to ~3/32 of the width
    assert _has(a[:, :2], GREEN).all() and _has(a[:, -2:], GREEN).all()
    assert _has(a[:, 5:27], RED).all()


def test_unknown_resize_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown resize mode 'stretch'; use one of squash, pad, crop"):
        resize(_wide(), 32, "stretch")


# --- encode ---------------------------------------------------------------------------------


def _smooth(size: int = 32) -> Image.Image:
    g = np.linspace(0, 255, size, dtype=np.float32)
    a = np.stack([np.add.outer(g, g) / 2, np.add.outer(g, 255 - g) / 2, np.full((size, size), 128.0)], axis=-1)
    return Image.fromarray(a.astype(np.uint8), "RGB")


@pytest.mark.parametrize("encoding, fmt, max_error", [("png", "PNG", 0), ("jpeg", "JPEG", 8)])
def test_encode_is_decodable_and_close(encoding: str, fmt: str, max_error: int) -> None:
    im = _smooth()
    data = encode(im, encoding)
    back = Image.open(io.BytesIO(data))
    assert back.format == fmt and back.size == im.size and back.mode == "RGB"
    diff = np.abs(np.asarray(back, dtype=int) - np.asarray(im, dtype=int))
    assert diff.max() <= max_error
    assert encode(im, encoding) == data  # same pixels, same bytes


def test_jpeg_quality_trades_bytes_for_error() -> None:
    im = _smooth(64)
    low, high = encode(im, "jpeg", quality=20), encode(im, "jpeg", quality=95)
    assert len(low) < len(high)
    err = [np.abs(np.asarray(Image.open(io.BytesIO(d)), dtype=int) - np.asarray(im, dtype=int)).mean()
           for d in (low, high)]
    assert err[1] < err[0]


def test_unknown_encoding_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown encoding 'webp'"):
        encode(_smooth(), "webp")


@pytest.mark.parametrize("mode", images.RESIZE_MODES)
def test_prepare_is_load_resize_encode(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "a.png"
    _wide().convert("P").save(path)
    assert prepare(path, 24, mode, "png") == encode(resize(load_rgb(path), 24, mode), "png")


def test_file_bytes_and_paths_decode_to_the_same_model_input(predict_images) -> None:
    image_set = predict_images
    for name in image_set.filenames[:7]:  # every kind of image in the set
        path = image_set.images_dir / name
        by_path = images.to_array(path, 32, "pad")
        assert by_path.shape == (32, 32, 3) and by_path.dtype == np.uint8
        np.testing.assert_array_equal(images.to_array(path.read_bytes(), 32, "pad"), by_path)
        with open(path, "rb") as fh:
            np.testing.assert_array_equal(images.to_array(fh, 32, "pad"), by_path)


@pytest.mark.parametrize("mode", images.RESIZE_MODES)
def test_preprocess_encodes_exactly_the_prediction_input(predict_images, mode: str) -> None:
    """One definition of "file -> model input": a lossless shard holds what prediction computes."""
    image_set = predict_images
    for name in image_set.filenames[:7]:
        path = image_set.images_dir / name
        stored = np.asarray(Image.open(io.BytesIO(images.prepare(path, 40, mode, "png"))).convert("RGB"))
        np.testing.assert_array_equal(stored, images.to_array(path, 40, mode))


def test_describe_failure_is_one_readable_line(tmp_path) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_text("hello")
    with pytest.raises(Exception) as info:
        images.load_rgb(bad)
    assert images.describe_failure(info.value).startswith("not an image file")
    assert images.describe_failure(FileNotFoundError("x")) == "no such file"
