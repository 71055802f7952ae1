"""Check the image files a labels CSV names, and find the images it does not name.

Every listed image is decoded in full by the function `preprocess` decodes with
(`images.load_rgb`), so an image that passes `split` cannot fail in `preprocess` unless the file
changes in between. A missing, empty, truncated or non-image file, a symlink out of the images
folder, or a decompression bomb (more pixels than `data.max_image_pixels`, read from the header
before any pixel is decoded) gets a one-line reason here; `labels.read_labels` turns it into a
problem on the row's CSV line, or a skipped row listed in reports/data/skipped.csv.

Decoding the built-in sample's 2,000 small images takes about 0.5 s in one process, less than a
process pool takes to start, so small folders are checked in this process and big ones (by
bytes, `PARALLEL_FROM_BYTES`) in a pool of every core. The result is the same either way.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import UnidentifiedImageError

from mlic import images

# What counts as an image when looking for files the CSV does not list (compared lower-case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
# Below this many bytes of images, decoding in this process beats starting a pool (~1 s).
PARALLEL_FROM_BYTES = 64 * 2**20


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def why_unusable(images_dir: Path, name: str, max_pixels: int) -> str | None:
    """Why image `name` (relative to `images_dir`) cannot be used, in one line with the fix; None if it can."""
    path = images_dir / name
    if not path.resolve().is_relative_to(images_dir.resolve()):  # a symlink pointing elsewhere
        return f"{name!r} resolves outside the images folder; copy the image into it"
    if path.is_dir():
        return f"{path} is a folder, not an image file; fix the filename"
    if not path.is_file():
        return f"image {path} does not exist; fix the filename or add the image"
    if path.stat().st_size == 0:
        return f"image {path} is empty (0 bytes); replace or remove it"
    try:
        images.load_rgb(path, max_pixels)
    except images.TooManyPixels as exc:
        return (f"image {path} has {exc} (data.max_image_pixels): a decompression bomb or a very large "
                "image; shrink or remove it, or raise data.max_image_pixels")
    except UnidentifiedImageError:
        return (f"image {path} cannot be read (not an image file PIL can open: JPEG, PNG, GIF, BMP, TIFF, "
                "WebP); replace or remove it")
    except PermissionError:
        return f"image {path} cannot be read (permission denied); make it readable or remove it"
    except Exception as exc:  # noqa: BLE001 - any failure to decode a user's file makes it a bad image
        return f"image {path} cannot be decoded ({_one_line(exc)}); replace or remove it"
    return None


def _check_chunk(task: tuple[str, list[str], int]) -> list[str | None]:
    images_dir, names, max_pixels = task
    return [why_unusable(Path(images_dir), name, max_pixels) for name in names]


def _total_bytes(images_dir: Path, names: list[str]) -> int:
    total = 0
    for name in names:
        try:
            total += (images_dir / name).stat().st_size
        except OSError:
            pass
    return total


def check_images(images_dir: Path, names: list[str], max_pixels: int, workers: int | None = None) -> list[str | None]:
    """`why_unusable` for each of `names`, in order.

    `workers`: processes to decode in (1: this process); None decides by the images' total size.
    """
    images_dir = Path(images_dir)
    if workers is None:
        workers = (os.cpu_count() or 1) if _total_bytes(images_dir, names) >= PARALLEL_FROM_BYTES else 1
    if workers <= 1 or len(names) < 2:
        return [why_unusable(images_dir, name, max_pixels) for name in names]
    chunk = max(1, min(64, len(names) // (workers * 4)))
    tasks = [(str(images_dir), names[i:i + chunk], max_pixels) for i in range(0, len(names), chunk)]
    # spawn, not fork: the same reason as tfrecords.worker_pool (a parent may hold threads).
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [reason for reasons in pool.map(_check_chunk, tasks) for reason in reasons]


def unlisted_images(images_dir: Path, listed: Iterable[str]) -> list[str]:
    """Image files under `images_dir` (by extension, sub-folders included) that `listed` does not name.

    Relative POSIX paths, sorted. Hidden files and folders (a leading dot: `.DS_Store`, macOS's
    `._img.jpg`, `.ipynb_checkpoints/`) are not images anyone meant to label and are not counted.
    Symlinked folders are not followed.
    """
    images_dir = Path(images_dir)
    listed = set(listed)
    found: list[str] = []
    for folder, dirs, files in os.walk(images_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(images_dir)
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            key = (rel / name).as_posix()
            if key not in listed:
                found.append(key)
    return sorted(found)
