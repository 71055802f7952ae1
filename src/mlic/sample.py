"""The built-in synthetic sample: a multi-label image set in the same format a user brings.

A fresh clone has no data and no internet, so the pipeline's first stage draws one:
``<out>/images/img_00000.jpg ...`` plus ``<out>/labels.csv`` with a ``filename`` column
(relative to ``images/``) and one 0/1 column per class.

Each image shows 0-4 kinds of geometric shape on a varied background. Labels come first,
from a documented procedure (`draw_labels`); the picture is then drawn from the labels
(`render_image`). Everything about image ``i`` depends only on ``(seed, i)`` (its own generator
``np.random.default_rng([seed, i])``), so images are independent of each other, can be made in
any order by any number of processes, and the same arguments give byte-identical files.
"""

from __future__ import annotations

import colorsys
import functools
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from mlic.atomic import atomic_dir, write_csv

log = logging.getLogger(__name__)

# --- Labels ---------------------------------------------------------------------------------
# Class names in labels.csv column order, each with the chance it is drawn before the
# co-occurrence rules and the cap below. Two classes are common (> 60 % of images) and three
# rare (< 10 %), so per-class thresholds and imbalance-aware metrics matter; the rare ones stay
# >= 4 % so a 15 % test split of 2,000 images still holds about 15 positives each.
BASE_RATES: dict[str, float] = {
    "circle": 0.78,
    "square": 0.74,
    "triangle": 0.28,
    "star": 0.24,
    "ring": 0.20,
    "cross": 0.16,
    "hexagon": 0.13,
    "crescent": 0.06,  # raised to ~20 % by the star rule below
    "heart": 0.075,
    "arrow": 0.065,
}
CLASSES: tuple[str, ...] = tuple(BASE_RATES)
_BASE = np.array(list(BASE_RATES.values()))

# Co-occurrence rules (given, then, probability), applied in order after the base draw: an
# image that has `given` but not `then` gains `then` with this probability. They make labels
# correlated the way real ones are (a night sky: stars and a crescent moon), so per-class
# models that ignore the other labels lose something.
COOCCURRENCE: tuple[tuple[str, str, float], ...] = (
    ("star", "crescent", 0.6),
    ("hexagon", "triangle", 0.5),
)

# Share of images forced to have no object at all (background and clutter only); the base
# rates add ~2 % more, for ~4-5 % empty rows: "none of the classes" is a real answer.
EMPTY_RATE = 0.025

# At most this many labels per image; extra ones are dropped at random.
MAX_LABELS = 4

# --- Pictures -------------------------------------------------------------------------------
# Object size as a fraction of the image's shorter side (the shape's diameter); never tiny,
# so each shape stays recognisable after resizing to 96 px.
OBJECT_SIZE = (0.15, 0.45)
# Chance that a present class is drawn a second time (presence, not count, is the label),
# up to MAX_OBJECTS shapes in all so they still fit without hiding each other.
REPEAT_RATE = 0.12
MAX_OBJECTS = 5
# Objects may overlap, but a shape's centre stays outside a bigger neighbour's radius by this
# fraction of its own radius, so at most about a third of any shape is hidden.
OVERLAP_MARGIN = 0.3
# Supersampling factor for shape masks (anti-aliased edges).
SUPERSAMPLE = 4

# --- Files ----------------------------------------------------------------------------------
# Share of each on-disk format, as users' folders have them; the rest are RGB JPEGs. Formats
# follow a golden-ratio sequence over the image index (not independent draws), so even a few
# hundred images hold every format close to its intended share.
FORMAT_MIX: dict[str, float] = {
    "gray_jpeg": 0.03,  # mode "L"
    "rgba_png": 0.015,  # mode "RGBA", fully opaque
    "palette_png": 0.015,  # mode "P", 256-colour adaptive palette
    "cmyk_jpeg": 0.01,
    "exif_jpeg": 0.02,  # pixels stored rotated 90 degrees, EXIF Orientation 6 or 8 undoes it
}
JPEG_QUALITY = (85, 95)  # uniform per image, inclusive
_GOLDEN = 0.6180339887498949
_EXIF_ORIENTATION = 0x0112


def draw_labels(
    rng: np.random.Generator,
    classes: tuple[str, ...] = CLASSES,
    base_rates: np.ndarray = _BASE,
    cooccurrence: tuple[tuple[str, str, float], ...] = COOCCURRENCE,
    empty_rate: float = EMPTY_RATE,
    max_labels: int = MAX_LABELS,
) -> np.ndarray:
    """Draw one image's labels: a 0/1 uint8 vector in `classes` order (this module's by default).

    Procedure: with probability `empty_rate` no labels; otherwise each class independently with
    its `base_rates` chance, then each `cooccurrence` rule in order, then drop randomly chosen
    labels beyond `max_labels`. Always consumes the same number of draws before the cap.
    """
    empty = rng.random() < empty_rate
    labels = rng.random(len(classes)) < base_rates
    for given, then, prob in cooccurrence:
        if rng.random() < prob and labels[classes.index(given)]:
            labels[classes.index(then)] = True
    if empty:
        labels[:] = False
    present = np.flatnonzero(labels)
    if len(present) > max_labels:
        labels[:] = False
        labels[rng.choice(present, size=max_labels, replace=False)] = True
    return labels.astype(np.uint8)


def _regular(n: int, radius: float = 1.0) -> np.ndarray:
    """Vertices of a regular n-gon with one vertex pointing up, circumradius `radius`."""
    t = -np.pi / 2 + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    return np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(axis=0) + pts.min(axis=0)) / 2
    return pts / np.abs(pts).max()


_W, _L = 0.3, 0.95  # cross arm half-width and length
_CIRCLE = _regular(96)
# Each shape is a list of (polygon in unit coordinates, fill): 255 adds, 0 cuts a hole.
# Every shape spans about the unit circle, so `radius` means the same size for all.
SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_CIRCLE, 255)],
    "square": [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.76, 255)],
    "triangle": [(_regular(3) + [0, 0.1], 255)],
    "star": [(_star(), 255)],
    "ring": [(_CIRCLE, 255), (_CIRCLE * 0.55, 0)],
    "cross": [
        (
            np.array([
                [-_W, -_L], [_W, -_L], [_W, -_W], [_L, -_W], [_L, _W], [_W, _W],
                [_W, _L], [-_W, _L], [-_W, _W], [-_L, _W], [-_L, -_W], [-_W, -_W],
            ]),
            255,
        )
    ],
    "hexagon": [(_regular(6), 255)],
    "crescent": [(_CIRCLE, 255), (_CIRCLE * 0.88 + [0.42, -0.1], 0)],
    "heart": [(_heart(), 255)],
    "arrow": [
        (
            np.array([[-1, -0.2], [0.1, -0.2], [0.1, -0.58], [1, 0], [0.1, 0.58], [0.1, 0.2], [-1, 0.2]]),
            255,
        )
    ],
}


def random_colour(
    rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]
) -> np.ndarray:
    """An RGB colour (float, 0-255) with uniform hue and saturation/value in the given ranges."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return np.array(rgb) * 255


def background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A solid, linear-gradient or smooth-noise background, with optional lines and blobs."""
    kind = rng.choice(["solid", "gradient", "noise"])
    base = random_colour(rng, (0.0, 0.8), (0.1, 1.0))
    if kind == "solid":
        arr = np.broadcast_to(base, (height, width, 3))
    elif kind == "gradient":
        other = random_colour(rng, (0.0, 0.8), (0.1, 1.0))
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        arr = base * (1 - t[..., None]) + other * t[..., None]
    else:  # smooth colour clouds: a coarse random grid upsampled bicubically
        gh, gw = rng.integers(2, 9, size=2)
        coarse = base + rng.normal(0, rng.uniform(20, 60), size=(gh, gw, 3))
        small = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
        arr = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    short = min(width, height)
    if rng.random() < 0.35:  # soft blurred blobs: clutter that is no class
        for _ in range(rng.integers(1, 5)):
            r = rng.uniform(0.1, 0.3) * short
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            mask = Image.new("L", (width, height), 0)
            ImageDraw.Draw(mask).ellipse(
                [cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=int(rng.integers(100, 200))
            )
            mask = mask.filter(ImageFilter.GaussianBlur(r * rng.uniform(0.4, 0.7)))
            colour = tuple(int(c) for c in random_colour(rng, (0.0, 1.0), (0.0, 1.0)))
            img.paste(colour, (0, 0), mask)
    if rng.random() < 0.35:
        draw_lines(img, rng)
    return img


def draw_lines(img: Image.Image, rng: np.random.Generator) -> None:
    """Draw 1-6 thin straight lines right across `img` (clutter that is no class)."""
    width, height = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 7)):
        # One point on each of two different sides, so a line always crosses the image
        # (two points on one side would draw a misleading line along the border).
        ends = []
        for side in rng.choice(4, size=2, replace=False):
            u = rng.random()
            points = [(u * width, 0), (width - 1, u * height), (u * width, height - 1), (0, u * height)]
            ends.append(points[side])
        colour = tuple(int(c) for c in random_colour(rng, (0.0, 1.0), (0.0, 1.0)))
        draw.line(ends, fill=colour, width=int(rng.integers(1, 3)))


# A shape drawn as strokes: (polyline in unit coordinates, line width as a fraction of the radius).
Stroke = tuple[np.ndarray, float]


def shape_mask(
    parts: list[tuple[np.ndarray, int]], radius: float, angle: float, aspect: float,
    offset: tuple[float, float], strokes: list[Stroke] = (),
) -> Image.Image:
    """An anti-aliased L mask of a shape (`SHAPES`-style polygon `parts`, then `strokes` with
    round joints and ends), centred at `offset` inside a square box of side 2.4 radius + 4."""
    side = int(math.ceil(2 * radius * 1.2)) + 4
    big = Image.new("L", (side * SUPERSAMPLE, side * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for poly, fill in parts:
        pts = poly * [aspect, 1 / aspect] * radius @ rot.T + offset
        draw.polygon([tuple(p) for p in pts * SUPERSAMPLE], fill=fill)
    for line, width in strokes:
        pts = (line * [aspect, 1 / aspect] * radius @ rot.T + offset) * SUPERSAMPLE
        w = width * radius * SUPERSAMPLE
        draw.line([tuple(p) for p in pts], fill=255, width=max(1, round(w)), joint="curve")
        for x, y in (pts[0], pts[-1]):  # round caps: PIL ends wide lines square
            draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=255)
    return big.reduce(SUPERSAMPLE)


def contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour that stands out from the mean colour `under` it, in RGB and in luminance."""
    luma = np.array([0.299, 0.587, 0.114])
    best, best_score = None, -1.0
    for _ in range(20):
        colour = random_colour(rng, (0.0, 1.0), (0.05, 1.0))
        dist = float(np.linalg.norm(colour - under))
        dluma = abs(float((colour - under) @ luma))
        score = min(dist / 110, dluma / 50)
        if score >= 1:
            best = colour
            break
        if score > best_score:
            best, best_score = colour, score
    return tuple(int(round(c)) for c in best)


def place(rng: np.random.Generator, radius: float, min_radius: float, width: int, height: int,
           placed: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Choose a centre for a shape inside the image that keeps overlap partial; may shrink it."""
    best = None
    for attempt in range(60):
        if attempt and attempt % 15 == 0:
            radius = max(min_radius, radius * 0.85)
        cx = rng.uniform(radius, width - radius)
        cy = rng.uniform(radius, height - radius)
        # The smaller shape's centre must lie outside the bigger one's radius plus a margin.
        slack = min(
            (math.hypot(cx - px, cy - py) - (max(radius, pr) + OVERLAP_MARGIN * min(radius, pr))
             for px, py, pr in placed),
            default=0.0,
        )
        if slack >= 0:
            return cx, cy, radius
        if best is None or slack > best[0]:
            best = (slack, (cx, cy, radius))
    return best[1]


def render_image(labels: np.ndarray, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Draw an upright RGB picture of `width` x `height` showing exactly the classes in `labels`.

    Each present class appears once (sometimes twice) with random size, position, colour,
    rotation and a mild aspect change, optionally outlined, over a random background; then mild
    blur and Gaussian noise. Only `rng` is used, so the same generator state gives the same image.
    """
    img = background(rng, width, height)
    short = min(width, height)
    objects = [CLASSES[k] for k in np.flatnonzero(labels)]
    repeats = [name for name in objects if rng.random() < REPEAT_RATE]
    objects += repeats[: max(0, MAX_OBJECTS - len(objects))]
    objects = [objects[k] for k in rng.permutation(len(objects))]  # drawing order = occlusion order
    placed: list[tuple[float, float, float]] = []
    for name in objects:
        radius = rng.uniform(*OBJECT_SIZE) * short / 2
        cx, cy, radius = place(rng, radius, OBJECT_SIZE[0] * short / 2, width, height, placed)
        placed.append((cx, cy, radius))
        angle = rng.uniform(0, 2 * np.pi)
        aspect = rng.uniform(0.92, 1.08)  # width:height up to ~1.17, so circles stay round-ish
        side = int(math.ceil(2 * radius * 1.2)) + 4
        x0, y0 = int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2))
        mask = shape_mask(SHAPES[name], radius, angle, aspect, (cx - x0, cy - y0))
        # Choose a colour against what is under the shape now (background and earlier shapes).
        region = np.asarray(img.crop((x0, y0, x0 + side, y0 + side)), dtype=np.float64)
        inside = np.asarray(mask) > 127
        under = region[inside].mean(axis=0) if inside.any() else region.reshape(-1, 3).mean(axis=0)
        fill = contrasting_colour(rng, under)
        if rng.random() < 0.3:  # a darker or lighter rim, as in drawings and icons
            rim = tuple(int(c * 0.4) if sum(fill) > 300 else int(c + (255 - c) * 0.6) for c in fill)
            img.paste(rim, (x0, y0), mask.filter(ImageFilter.MaxFilter(int(rng.choice([3, 5])))))
        img.paste(fill, (x0, y0), mask)
    if rng.random() < 0.15:  # lines over the objects too: occluding clutter
        draw_lines(img, rng)
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.uniform(1.0, 6.0) * rng.standard_normal(arr.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def file_format(index: int, offset: float, mix: dict[str, float] = FORMAT_MIX) -> str:
    """Image `index`'s format: a `mix` key (`FORMAT_MIX` by default), or "rgb_jpeg" for the remainder.

    The golden-ratio point `(offset + index * 0.618...) mod 1` walks through the shares in turn.
    """
    u = (offset + index * _GOLDEN) % 1.0
    edge = 0.0
    for name, share in mix.items():
        edge += share
        if u < edge:
            return name
    return "rgb_jpeg"


def format_offset(seed: int) -> float:
    """Where the golden-ratio format sequence starts for `seed`."""
    return float(np.random.default_rng(seed).random())


def save_image(img: Image.Image, images_dir: Path, stem: str, fmt: str, seed: int, index: int,
               jpeg_quality: tuple[int, int] = JPEG_QUALITY) -> str:
    """Save RGB `img` as `images_dir/<stem>.<ext>` in format `fmt`; return the filename.

    `fmt` is "<mode>_<container>": rgb, gray (L), rgba, palette (P, 256-colour adaptive), cmyk or
    exif (rotated pixels + Orientation tag) with jpeg or png. Quality and orientation come from
    the image's own stream `default_rng([seed, index, 1])`, drawn in the same order for every format.
    """
    rng = np.random.default_rng([seed, index, 1])  # file details: a stream of their own
    quality = int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1))
    orientation = int(rng.choice([6, 8]))
    if fmt.endswith("_png"):
        filename = f"{stem}.png"
        convert = {"rgba_png": lambda im: im.convert("RGBA"), "gray_png": lambda im: im.convert("L"),
                   "palette_png": lambda im: im.quantize(colors=256), "rgb_png": lambda im: im}[fmt]
        convert(img).save(images_dir / filename, format="PNG")
        return filename
    filename = f"{stem}.jpg"
    kwargs: dict[str, object] = {"format": "JPEG", "quality": quality}
    if fmt == "gray_jpeg":
        img = img.convert("L")
    elif fmt == "cmyk_jpeg":
        img = img.convert("CMYK")
    elif fmt == "exif_jpeg":
        # Store the pixels turned so that the viewer's rotation (tag 6: 90 deg clockwise,
        # tag 8: 90 deg counter-clockwise) restores the upright picture, as cameras do.
        img = img.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = orientation
        kwargs["exif"] = exif.tobytes()
    elif fmt != "rgb_jpeg":
        raise ValueError(f"unknown image format {fmt!r}")
    img.save(images_dir / filename, **kwargs)
    return filename


def make_example(seed: int, index: int, min_size: int, max_size: int) -> tuple[np.ndarray, Image.Image]:
    """Labels and upright RGB picture of image `index`, from its own `default_rng([seed, index])`."""
    rng = np.random.default_rng([seed, index])
    labels = draw_labels(rng)
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    return labels, render_image(labels, rng, width, height)


def _make_one(index: int, *, seed: int, min_size: int, max_size: int, images_dir: Path,
              format_offset: float, name_width: int) -> tuple[str, np.ndarray]:
    """Draw, render and save image `index`; return its filename and labels."""
    labels, img = make_example(seed, index, min_size, max_size)
    fmt = file_format(index, format_offset)
    return save_image(img, images_dir, f"img_{index:0{name_width}d}", fmt, seed, index), labels


def generate_sample(out_dir: Path, n_images: int, seed: int, min_size: int, max_size: int,
                    workers: int | None = None) -> pd.DataFrame:
    """Write `n_images` synthetic images and `labels.csv` to `out_dir`, atomically.

    `out_dir` is replaced as a whole only when everything is written. Each side of each image
    is uniform in [min_size, max_size]. `workers` processes share the work (None or 0: all
    cores); the output is byte-identical for any number. Returns the labels table written.
    """
    return write_image_set(out_dir, n_images, seed, min_size, max_size, workers, _make_one, CLASSES)


def write_image_set(out_dir: Path, n_images: int, seed: int, min_size: int, max_size: int,
                    workers: int | None, make_one: Callable[..., tuple[str, np.ndarray]],
                    classes: tuple[str, ...]) -> pd.DataFrame:
    """Write images `0 .. n_images - 1` with `make_one` and their `labels.csv`, atomically.

    `make_one(index, *, seed, min_size, max_size, images_dir, format_offset, name_width)` is a
    module-level function (worker processes import it) that saves image `index` and returns its
    filename and labels in `classes` order. The shared rules of every sample kind live here:
    argument checks, the process pool, index order, and `out_dir` replaced only when complete.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    workers = max(1, min(workers or os.cpu_count() or 1, n_images))
    start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        images_dir = tmp / "images"
        images_dir.mkdir()
        make = functools.partial(
            make_one,
            seed=seed,
            min_size=min_size,
            max_size=max_size,
            images_dir=images_dir,
            format_offset=format_offset(seed),
            name_width=max(5, len(str(n_images - 1))),
        )
        log.info("drawing %d images (seed %d, %d-%d px) with %d worker(s)", n_images, seed,
                 min_size, max_size, workers)
        if workers == 1:
            rows = list(map(make, range(n_images)))
        else:
            # spawn, not fork: safe even if the parent has threads (e.g. TensorFlow loaded).
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers) as pool:
                # imap keeps index order and streams results: only labels are held in memory.
                rows = list(pool.imap(make, range(n_images), chunksize=16))
        matrix = np.stack([labels for _, labels in rows]).astype(np.int64)
        frame = pd.DataFrame(matrix, columns=list(classes))
        frame.insert(0, "filename", [name for name, _ in rows])
        write_csv(tmp / "labels.csv", frame)
    seconds = time.perf_counter() - start
    log.info("wrote %d images and labels.csv to %s in %.1f s", n_images, out_dir, seconds)
    return frame
