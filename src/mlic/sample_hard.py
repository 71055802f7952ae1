"""The hard built-in benchmark (`sample.kind: hard`): what users' data does to a model that the
easy sample (`mlic.sample`, 10 large shapes) does not.

Same format and rules as the sample: ``<out>/images/img_00000.<jpg|png>`` plus ``labels.csv``
(``filename`` + one 0/1 column per class, in `CLASSES` order); everything about image ``i``
depends only on ``(seed, i)``, so any number of worker processes writes byte-identical files.
Three streams per image: ``default_rng([seed, i])`` plans it (labels, size, every object's
class, place, size and rotation: `plan_image`, pure, so tests check geometry without parsing
pixels); ``[seed, i, 2]`` paints it (background, clutter, colours, textures, noise);
``[seed, i, 1]`` chooses file details (JPEG quality), as in the sample.

The traits, each one deliberate (numbers measured on 4,000 images, seed 42, 96-320 px):

- **22 classes, a long tail** (`CLASSES`): 4 common (circle, square, pip, triangle: 31-44 % of
  images), the rarest 1.3 % (glyph_f: ~50 positives in 4,000, ~8 in a 15 % test split), 7 classes
  under 5 %. Co-occurrence rules tie labels together (`COOCCURRENCE`); ~4.5 % have no label.
- **Small objects beside large ones** (`SIZES`): 9 large classes (the cat among them) are 20-45 %
  of the image's shorter side (its diameter); 11 classes are small-only, 3-12 % (a "pip" can be
  3 px wide in a 96 px image); star and heart come at any size (8-40 %), so size alone does not
  give the class. Small objects are drawn last, so none is hidden under a larger one.
- **Fine detail**: six glyphs (`GLYPHS`) share a stem and a diagonal and differ in one stroke;
  at 6-12 % of the side (never under 10 px) each is readable at native resolution, and a 64 px
  resize leaves them 4-8 px wide: only resolution tells them apart. No glyph is another's mirror
  image (a horizontal-flip augmentation keeps every label true).
- **A silhouette** (cat): an outline always filled with a random texture (solid, stripes,
  checks, noise, gradient) in random colours; the large shapes and the clutter use the same
  textures 30 % of the time, so only the outline identifies it.
- **Clutter that is no class**: irregular blobs (solid or textured), thin scratches, the
  sample's soft blobs and lines, textured or noisy backgrounds.
- **Files as users have them**: each side uniform in [min_size, max_size]; RGB, grayscale (L)
  and palette (P) images, in JPEG (quality 70-95) and PNG (`FORMAT_MIX`).

Image size comes from the caller (`sample.min_size`/`max_size`; the benchmark uses 96 and 320),
not from defaults hidden here: one key, one meaning, whatever the kind, and the params DVC
records are the sizes used. Below ~84 px a glyph's 10 px floor is capped at 12 % of the side.

Per-class prevalence (%) on 4,000 images, seed 42: circle 43.7, square 41.7, pip 38.9, triangle
31.5, glyph_a 15.4, star 13.7, tick 13.4, ring 11.9, crescent 9.2, glyph_b 9.0, glyph_c 8.6,
cross 8.5, cat 7.3, chevron 6.9, glyph_d 6.0, hexagon 4.6, bolt 3.8, heart 3.6, eye 3.4,
arrow 2.4, glyph_e 1.8, glyph_f 1.3; no label 4.7; 2.9 labels per image. 4,000 images take
~20 s with 2 worker processes (38 CPU-s; ~90 MB).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from mlic.sample import (
    SHAPES,
    Stroke,
    background,
    contrasting_colour,
    draw_labels,
    draw_lines,
    file_format,
    place,
    random_colour,
    save_image,
    shape_mask,
    write_image_set,
)

# --- Classes --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Size:
    """An object's diameter as a fraction of the image's shorter side, with a floor in pixels
    (never above `hi`) for shapes whose detail needs that many pixels to exist at all."""

    lo: float
    hi: float
    min_px: float = 0.0


LARGE = Size(0.20, 0.45)
ANY = Size(0.08, 0.40)

# Class -> (base rate before the co-occurrence rules and the cap, size). Rates give 4 classes
# above 30 %, 7 under 5 % and the rarest at ~1.3 % (see the module docstring's measured table).
_CLASS_TABLE: dict[str, tuple[float, Size]] = {
    # large shapes, reused from the sample (`mlic.sample.SHAPES`)
    "circle": (0.45, LARGE),
    "square": (0.40, LARGE),
    "triangle": (0.32, LARGE),   # a little more with the hexagon rule
    "star": (0.14, ANY),
    "ring": (0.12, LARGE),
    "cross": (0.09, LARGE),
    "hexagon": (0.05, LARGE),
    "crescent": (0.025, LARGE),  # ~9 % with the star rule
    "heart": (0.035, ANY),
    "arrow": (0.026, LARGE),
    # the silhouette: colour and texture vary, only the outline identifies it
    "cat": (0.07, LARGE),
    # small-only shapes; a pip goes down to 3 % of the side (3 px at 96 px), the smallest thing asked for
    "pip": (0.40, Size(0.03, 0.06)),
    "tick": (0.12, Size(0.04, 0.09, 6)),  # ~13 % with the square rule (a ticked box)
    "chevron": (0.065, Size(0.04, 0.09, 6)),
    "eye": (0.018, Size(0.05, 0.10, 7)),  # ~3.4 % with the cat rule
    "bolt": (0.037, Size(0.05, 0.11, 7)),
    # glyphs: the same strokes with one moved or added; 10 px is a 3x3 stroke grid of 1 px lines
    "glyph_a": (0.15, Size(0.06, 0.12, 10)),
    "glyph_b": (0.09, Size(0.06, 0.12, 10)),
    "glyph_c": (0.035, Size(0.06, 0.12, 10)),  # ~9 % with the glyph_a rule
    "glyph_d": (0.026, Size(0.06, 0.12, 10)),  # ~6 % with the glyph_b rule
    "glyph_e": (0.02, Size(0.06, 0.12, 10)),
    "glyph_f": (0.015, Size(0.06, 0.12, 10)),
}
CLASSES: tuple[str, ...] = tuple(_CLASS_TABLE)
BASE_RATES: dict[str, float] = {name: rate for name, (rate, _) in _CLASS_TABLE.items()}
SIZES: dict[str, Size] = {name: size for name, (_, size) in _CLASS_TABLE.items()}
SMALL_ONLY: tuple[str, ...] = tuple(name for name, size in SIZES.items() if size.hi <= 0.12)
_BASE = np.array(list(BASE_RATES.values()))

# (given, then, probability), as in the sample: things that come together in real pictures
# (a night sky, a ticked box, glyphs written in groups), so a model may use one label for another.
COOCCURRENCE: tuple[tuple[str, str, float], ...] = (
    ("star", "crescent", 0.5),
    ("hexagon", "triangle", 0.5),
    ("square", "tick", 0.06),
    ("cat", "eye", 0.25),
    ("glyph_a", "glyph_c", 0.3),
    ("glyph_b", "glyph_d", 0.3),
)
# No forced empty images: the base rates alone leave ~4.5 % with no label ("none of these" is a
# real answer), and a forced share would push it past 5 %.
EMPTY_RATE = 0.0
MAX_LABELS = 6
# A present class is drawn again with this chance (presence is the label, not the count).
REPEAT_RATE = 0.15
MAX_OBJECTS = 8

# --- Shapes ---------------------------------------------------------------------------------
# Glyph strokes on a 3x3 grid (x right, y down, points at -1, 0, 1), scaled by 0.7 so a glyph
# fits the unit circle like every other shape. All share the stem and the upper-left diagonal;
# each adds one stroke. Only glyph_b contains the upper-right diagonal, and every mirror image
# (x -> -x) contains it, so no glyph is the mirror of another (glyph_b is its own).
_STEM = ((0, -1), (0, 1))
_UPPER_LEFT = ((-1, -1), (0, 0))
_GLYPH_EXTRA: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "glyph_a": ((0, 0), (1, 1)),     # lower-right diagonal from the centre
    "glyph_b": ((0, 0), (1, -1)),    # upper-right diagonal: a Y
    "glyph_c": ((0, 1), (1, 0)),     # the same diagonal moved down to the foot
    "glyph_d": ((0, 0), (1, 0)),     # a horizontal arm
    "glyph_e": ((0, 0), (-1, 1)),    # lower-left diagonal
    "glyph_f": ((0, -1), (1, -1)),   # a flag at the top
}
_GLYPH_SCALE = 0.7
GLYPH_WIDTH = 0.22  # stroke width / radius: ~1 px at the 10 px floor
GLYPHS: dict[str, tuple[tuple[tuple[int, int], tuple[int, int]], ...]] = {
    name: (_STEM, _UPPER_LEFT, extra) for name, extra in _GLYPH_EXTRA.items()
}


def _circle(n: int = 48, r: float = 1.0, c: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], axis=1)


def _ellipse(rx: float, ry: float, c: tuple[float, float], n: int = 48) -> np.ndarray:
    return _circle(n) * [rx, ry] + c


# A sitting cat, facing the viewer: body, head, two ears, and a curled tail drawn as a stroke.
_CAT_PARTS = [
    (_ellipse(0.42, 0.5, (0.0, 0.35)), 255),
    (_circle(r=0.3, c=(0.0, -0.4)), 255),
    (np.array([[-0.29, -0.52], [-0.24, -0.92], [-0.04, -0.68]]), 255),
    (np.array([[0.29, -0.52], [0.24, -0.92], [0.04, -0.68]]), 255),
]
_CAT_TAIL: list[Stroke] = [(np.array([[0.35, 0.75], [0.62, 0.62], [0.78, 0.35], [0.74, 0.05]]), 0.14)]

# name -> (polygon parts, strokes): what `shape_mask` draws, each spanning about the unit circle.
GEOMETRY: dict[str, tuple[list[tuple[np.ndarray, int]], list[Stroke]]] = {
    **{name: (SHAPES[name], []) for name in CLASSES if name in SHAPES},
    "cat": (_CAT_PARTS, _CAT_TAIL),
    "pip": ([(np.array([[0, -1], [0.7, 0], [0, 1], [-0.7, 0]]), 255)], []),
    "eye": ([(_circle(), 255), (_circle(r=0.62), 0), (_circle(r=0.3), 255)], []),
    "bolt": ([(np.array([[0.25, -1], [-0.55, 0.12], [-0.02, 0.12], [-0.25, 1], [0.55, -0.16],
                         [0.03, -0.16]]), 255)], []),
    "tick": ([], [(np.array([[-0.8, 0.0], [-0.25, 0.6], [0.8, -0.65]]), 0.35)]),
    "chevron": ([], [(np.array([[-0.8, 0.4], [0.0, -0.4], [0.8, 0.4]]), 0.35)]),
    **{name: ([], [(np.array(seg, dtype=float) * _GLYPH_SCALE, GLYPH_WIDTH) for seg in strokes])
       for name, strokes in GLYPHS.items()},
}

# Rotation either way, radians: glyphs, ticks, chevrons and the cat stay near upright (a glyph
# turned far is another glyph; a chevron turned over is a V), the rest turn freely.
_TILT = {name: math.radians(10) for name in GLYPHS} | {
    "tick": math.radians(25), "chevron": math.radians(25), "cat": math.radians(20), "arrow": math.pi}
# Glyphs keep their proportions; other shapes may stretch a little, as in the sample.
_ASPECT = {name: (0.95, 1.05) for name in GLYPHS}

# --- Pictures -------------------------------------------------------------------------------
TEXTURES = ("solid", "stripes", "checks", "noise", "gradient")
TEXTURED_SHAPE_RATE = 0.3  # large shapes (not the cat, always textured) filled with a texture
# Clutter per image: blobs and thin 1 px scratches (8-25 % of the side long), none a class. Blobs
# are never small-object sized: a 7 px potato and a 7 px pip would be the same few pixels.
BLOBS = (0, 3)
BLOB_SIZE = (0.12, 0.35)
SCRATCHES = (0, 4)
BACKGROUND_TEXTURE_RATE = 0.35  # a faint texture over the background: small objects must stand out
BLUR = (0.25, (0.3, 0.6))  # chance and sigma range: enough to soften, never to erase a 1 px stroke
NOISE = (1.0, 8.0)  # Gaussian pixel noise, sigma uniform in this range

# --- Files ----------------------------------------------------------------------------------
# Shares of each format (golden-ratio sequence over the index, as in the sample); the rest, 55 %,
# RGB JPEG. Grayscale and palette images lose colour or shades: the model must use shape.
FORMAT_MIX: dict[str, float] = {
    "gray_jpeg": 0.12,
    "rgb_png": 0.12,
    "gray_png": 0.06,
    "palette_png": 0.15,
}
JPEG_QUALITY = (70, 95)  # lower than the sample's: compression blurs fine detail, as in the wild


@dataclasses.dataclass(frozen=True)
class PlannedObject:
    """One drawn object: its class, centre and diameter in pixels, rotation (radians), aspect."""

    name: str
    cx: float
    cy: float
    diameter: float
    angle: float
    aspect: float


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: labels is an array; compare fields
class Plan:
    """Everything about image `index` but its colours: labels (in `CLASSES` order), size, and
    objects in drawing order (largest first, so small objects are never covered)."""

    labels: np.ndarray
    width: int
    height: int
    objects: tuple[PlannedObject, ...]


def plan_image(seed: int, index: int, min_size: int, max_size: int) -> Plan:
    """Labels, size and object geometry of image `index`, from `default_rng([seed, index])` only."""
    rng = np.random.default_rng([seed, index])
    labels = draw_labels(rng, CLASSES, _BASE, COOCCURRENCE, EMPTY_RATE, MAX_LABELS)
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    short = min(width, height)
    names = [CLASSES[k] for k in np.flatnonzero(labels)]
    repeats = [name for name in names if rng.random() < REPEAT_RATE]
    names += repeats[: max(0, MAX_OBJECTS - len(names))]
    sized = []
    for name in names:
        size = SIZES[name]
        floor = min(max(size.lo * short, size.min_px), size.hi * short)
        sized.append((name, max(rng.uniform(size.lo, size.hi) * short, floor), floor))
    # Place the largest first (they need the room) and draw in that order (small ones stay on top).
    sized.sort(key=lambda item: -item[1])
    placed: list[tuple[float, float, float]] = []
    objects = []
    for name, diameter, floor in sized:
        cx, cy, radius = place(rng, diameter / 2, floor / 2, width, height, placed)
        placed.append((cx, cy, radius))
        tilt = _TILT.get(name, math.pi)
        angle = rng.uniform(-tilt, tilt)
        aspect = rng.uniform(*_ASPECT.get(name, (0.92, 1.08)))
        objects.append(PlannedObject(name, cx, cy, 2 * radius, angle, aspect))
    return Plan(labels, width, height, tuple(objects))


def texture(rng: np.random.Generator, width: int, height: int, colours: tuple[np.ndarray, np.ndarray],
            kind: str | None = None) -> Image.Image:
    """An RGB texture of two colours: solid, stripes, checks, noise or a gradient (random kind)."""
    kind = kind or str(rng.choice(TEXTURES))
    a, b = (np.asarray(c, dtype=np.float64) for c in colours)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(3.0, max(4.0, min(width, height) / 3))
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if kind == "solid":
        t = np.zeros((height, width))
    elif kind == "stripes":
        t = (np.floor(u / period) % 2).astype(np.float64)
    elif kind == "checks":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)
    elif kind == "noise":  # blotches (a coarse random grid, upsampled) plus per-pixel grain
        grid = int(rng.integers(2, 12))
        coarse = rng.random((grid, grid))
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC), dtype=np.float64) / 255
        t = np.clip(0.6 * t + 0.4 * rng.random((height, width)), 0, 1)
    else:  # gradient
        t = (u - u.min()) / max(u.max() - u.min(), 1e-6)
    arr = a * (1 - t[..., None]) + b * t[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _box(obj: PlannedObject) -> tuple[int, int, int]:
    """Top-left corner and side of the square box `shape_mask` draws `obj` in."""
    side = int(math.ceil(obj.diameter * 1.2)) + 4
    return int(math.floor(obj.cx - side / 2)), int(math.floor(obj.cy - side / 2)), side


def _under(img: Image.Image, x0: int, y0: int, side: int, mask: Image.Image) -> np.ndarray:
    """Mean colour of `img` under `mask` placed at (x0, y0) (of the whole box if the mask is empty)."""
    region = np.asarray(img.crop((x0, y0, x0 + side, y0 + side)), dtype=np.float64)
    inside = np.asarray(mask) > 127
    return region[inside].mean(axis=0) if inside.any() else region.reshape(-1, 3).mean(axis=0)


def _draw_clutter(img: Image.Image, rng: np.random.Generator) -> None:
    """Blobs (smooth potato outlines, solid or textured) and thin scratches: no class looks like them."""
    width, height = img.size
    short = min(width, height)
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    for _ in range(rng.integers(BLOBS[0], BLOBS[1] + 1)):
        # Radius = 1 + low harmonics: no corners (not a polygon class), too long for a circle (the
        # 2nd harmonic makes it 1.5-2 times as long as wide), too weak a 3rd for lobes (no heart).
        amp = rng.uniform([0.2, 0.03, 0.0], [0.35, 0.12, 0.08])
        r = 1 + sum(a * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for a, k in zip(amp, (2, 3, 5)))
        poly = np.stack([r * np.cos(t), r * np.sin(t)], axis=1) / r.max()
        obj = PlannedObject("blob", rng.uniform(0, width), rng.uniform(0, height),
                            rng.uniform(*BLOB_SIZE) * short, 0.0, 1.0)
        x0, y0, side = _box(obj)
        mask = shape_mask([(poly, 255)], obj.diameter / 2, 0.0, 1.0, (obj.cx - x0, obj.cy - y0))
        _fill(img, rng, mask, x0, y0, side, textured=rng.random() < TEXTURED_SHAPE_RATE)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(SCRATCHES[0], SCRATCHES[1] + 1)):
        length = rng.uniform(0.08, 0.25) * short
        x, y, a = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0, 2 * np.pi)
        colour = tuple(int(c) for c in random_colour(rng, (0.0, 1.0), (0.0, 1.0)))
        draw.line([(x, y), (x + length * math.cos(a), y + length * math.sin(a))], fill=colour, width=1)


def _fill(img: Image.Image, rng: np.random.Generator, mask: Image.Image, x0: int, y0: int, side: int,
          textured: bool) -> None:
    """Paint `mask` at (x0, y0) in a colour (or a two-colour texture) that stands out from what is under it."""
    under = _under(img, x0, y0, side, mask)
    first = np.array(contrasting_colour(rng, under), dtype=np.float64)
    if textured:
        second = np.array(contrasting_colour(rng, under), dtype=np.float64)
        img.paste(texture(rng, side, side, (first, second)), (x0, y0), mask)
    else:
        img.paste(tuple(int(c) for c in first), (x0, y0), mask)


def render_plan(plan: Plan, rng: np.random.Generator) -> Image.Image:
    """Paint `plan` as an upright RGB image: background, clutter, the planned objects, noise.

    Only `rng` is used for appearance, so the same plan and generator state give the same image.
    """
    width, height = plan.width, plan.height
    img = background(rng, width, height)
    if rng.random() < BACKGROUND_TEXTURE_RATE:
        colours = (random_colour(rng, (0.0, 1.0), (0.0, 1.0)), random_colour(rng, (0.0, 1.0), (0.0, 1.0)))
        img = Image.blend(img, texture(rng, width, height, colours), rng.uniform(0.1, 0.3))
    _draw_clutter(img, rng)
    for obj in plan.objects:
        x0, y0, side = _box(obj)
        parts, strokes = GEOMETRY[obj.name]
        mask = shape_mask(parts, obj.diameter / 2, obj.angle, obj.aspect, (obj.cx - x0, obj.cy - y0), strokes)
        textured = obj.name == "cat" or (obj.name in SHAPES and rng.random() < TEXTURED_SHAPE_RATE)
        _fill(img, rng, mask, x0, y0, side, textured)
    if rng.random() < 0.15:  # lines over the objects too: occluding clutter
        draw_lines(img, rng)
    if rng.random() < BLUR[0]:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR[1])))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.uniform(*NOISE) * rng.standard_normal(arr.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def make_example(seed: int, index: int, min_size: int, max_size: int) -> tuple[Plan, Image.Image]:
    """Plan and upright RGB picture of image `index` (appearance from `default_rng([seed, index, 2])`)."""
    plan = plan_image(seed, index, min_size, max_size)
    return plan, render_plan(plan, np.random.default_rng([seed, index, 2]))


def _make_one(index: int, *, seed: int, min_size: int, max_size: int, images_dir: Path,
              format_offset: float, name_width: int) -> tuple[str, np.ndarray]:
    """Plan, render and save image `index`; return its filename and labels."""
    plan, img = make_example(seed, index, min_size, max_size)
    fmt = file_format(index, format_offset, FORMAT_MIX)
    filename = save_image(img, images_dir, f"img_{index:0{name_width}d}", fmt, seed, index, JPEG_QUALITY)
    return filename, plan.labels


def generate_hard(out_dir: Path, n_images: int, seed: int, min_size: int, max_size: int,
                  workers: int | None = None) -> pd.DataFrame:
    """Write `n_images` hard-benchmark images and `labels.csv` to `out_dir`, atomically.

    The same contract as `mlic.sample.generate_sample`: sides uniform in [min_size, max_size],
    byte-identical output for any `workers`, `out_dir` replaced only when complete.
    """
    return write_image_set(out_dir, n_images, seed, min_size, max_size, workers, _make_one, CLASSES)
