"""Decode and resize a split's images to exactly R x R RGB uint8, staged in a memory-mapped file.

Staging first means the split's size (after skipping undecodable files), its mean/std and
its subsets are known before any .beton is written, and large sources never sit in RAM.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mlpscale.data.sources import SplitSource
from mlpscale.errors import MlpscaleError

log = logging.getLogger(__name__)


class UndecodableImage(Exception):
    """An image file neither Pillow nor OpenCV can decode."""


@dataclass
class StagedSplit:
    images: np.ndarray  # (N, R, R, 3) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64
    skipped: list[dict] = field(default_factory=list)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def remove(self) -> None:
        self.images = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) from grayscale (H, W) / (H, W, 1) or RGBA (composited on white)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        blended = image[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if channels == 3:
        return image
    raise ValueError(f"unsupported channel count {channels}")


def decode_file(path: Path) -> np.ndarray:
    """RGB uint8 pixels of an image file: Pillow first, OpenCV as the fallback."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            if opened.mode in ("RGBA", "LA", "PA") or (opened.mode == "P" and "transparency" in opened.info):
                return to_rgb(np.asarray(opened.convert("RGBA")))
            return to_rgb(np.asarray(opened.convert("RGB")))
    except Exception as pil_error:  # noqa: BLE001 - any decoder failure means "try the next decoder"
        encoded = np.fromfile(path, dtype=np.uint8)
        decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) if encoded.size else None
        if decoded is None:
            raise UndecodableImage(f"{type(pil_error).__name__}: {pil_error}") from pil_error
        if decoded.dtype != np.uint8:
            decoded = cv2.convertScaleAbs(decoded, alpha=255.0 / max(float(decoded.max()), 1.0))
        if decoded.ndim == 3 and decoded.shape[2] == 4:
            decoded = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGBA)
        elif decoded.ndim == 3:
            decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
        return to_rgb(decoded)


def resize_exact(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize to exactly R x R: area averaging when shrinking, bilinear when growing, untouched when equal."""
    height, width = image.shape[:2]
    if height == resolution and width == resolution:
        return image
    shrinking = height * width > resolution * resolution
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (resolution, resolution), interpolation=interpolation)


def _prepare(item, resolution: int) -> tuple[np.ndarray | None, str | None]:
    """(R x R pixels, None) for an array or a decodable file; (None, reason) for an undecodable file."""
    if isinstance(item, (str, os.PathLike)):
        try:
            pixels = decode_file(Path(item))
        except UndecodableImage as error:
            return None, str(error)
    else:
        pixels = to_rgb(item)
    return resize_exact(pixels, resolution), None


def _prepare_labelled(args: tuple[Path, int, int]):
    """Pool task: the item and its label travel together so results arrive matched, in order."""
    item, label, resolution = args
    return _prepare(item, resolution), (item, label)


def default_decode_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def stage_split(
    split: SplitSource,
    resolution: int,
    stage_path: Path,
    *,
    strict: bool = False,
    description: str = "decoding",
    decode_workers: int | None = None,
) -> StagedSplit:
    """Decode every item of `split`, resize it to R x R, and store it in a memmap at `stage_path`.

    Image files are decoded by a pool of `decode_workers` processes (in order); in-memory arrays in this process.
    """
    stage_path = Path(stage_path)
    workers = default_decode_workers() if decode_workers is None else max(1, int(decode_workers))
    images = np.memmap(stage_path, dtype=np.uint8, mode="w+", shape=(max(split.size, 1), resolution, resolution, 3))
    labels = np.empty(split.size, dtype=np.int64)
    skipped: list[dict] = []
    count = 0
    iterator = iter(split.items())
    first = next(iterator, None)
    items = itertools.chain([first] if first is not None else [], iterator)
    pool = None
    try:
        if first is not None and isinstance(first[0], (str, os.PathLike)) and workers > 1:
            pool = multiprocessing.Pool(workers)
            prepared = pool.imap(_prepare_labelled, ((item, label, resolution) for item, label in items), chunksize=16)
        else:
            prepared = ((_prepare(item, resolution), (item, label)) for item, label in items)
        for (pixels, error), (item, label) in tqdm(prepared, total=split.size, desc=description, unit="img"):
            if pixels is None:
                if strict:
                    raise MlpscaleError(
                        f"cannot decode image {item} ({error}); remove or fix it, or drop --strict to skip it"
                    )
                log.warning("skipping undecodable image %s (%s)", item, error)
                skipped.append({"split": split.name, "file": str(item), "error": error})
                continue
            if count >= split.size:
                raise MlpscaleError(f"source split {split.name} yielded more than its declared {split.size} items")
            images[count] = pixels
            labels[count] = label
            count += 1
        images.flush()
    except BaseException:
        del images
        stage_path.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    view = (
        np.memmap(stage_path, dtype=np.uint8, mode="r", shape=(count, resolution, resolution, 3))
        if count
        else np.zeros((0, resolution, resolution, 3), dtype=np.uint8)
    )
    return StagedSplit(images=view, labels=labels[:count], skipped=skipped, path=stage_path)
