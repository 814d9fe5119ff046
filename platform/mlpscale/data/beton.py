"""Write (image, label) arrays to an FFCV .beton atomically, and read one back without the loader.

The file is written as `<name>.beton.tmp-<pid>` and renamed only once complete, so an
interrupted conversion never leaves a file that looks whole. FFCV's own writer waits
forever when a worker process dies; `_CheckedWriter` notices and raises instead.
"""

from __future__ import annotations

import mlpscale.data.ffcv_import  # noqa: F401  (first: before FFCV, the fast import that keeps torch's threads)

# isort: split

import ctypes
import logging
import os
from multiprocessing import Process, Queue, Value
from pathlib import Path
from time import sleep

import cv2
import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.reader import Reader
from ffcv.writer import DatasetWriter
from tqdm import tqdm

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
_JPG_MODE = 0  # ffcv's IMAGE_MODES['jpg']


class BetonWriteError(RuntimeError):
    """A writer process died before the .beton was complete."""


class _ArrayDataset:
    """Indexable (image, label) pairs over uint8 (N, R, R, 3) images; a memmap travels to workers by file name."""

    def __init__(self, images, labels):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return np.ascontiguousarray(self.images[index]), int(self.labels[index])

    def __getstate__(self):
        state = dict(self.__dict__)
        if isinstance(self.images, np.memmap) and self.images.filename:
            state["images"] = ("memmap", self.images.filename, self.images.shape, self.images.offset)
        return state

    def __setstate__(self, state):
        if isinstance(state["images"], tuple) and state["images"][0] == "memmap":
            _, filename, shape, offset = state["images"]
            state["images"] = np.memmap(filename, dtype=np.uint8, mode="r", shape=shape, offset=offset)
        self.__dict__.update(state)


class _CheckedWriter(DatasetWriter):
    """FFCV's DatasetWriter with a named progress bar and a check that its workers are still alive."""

    description = "writing"

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        self.prepare()
        workqueue: Queue = Queue()
        for todo in queue_content:
            workqueue.put(todo)
        allocations_queue: Queue = Queue()
        for _ in range(self.num_workers):
            workqueue.put(None)
        done_number = Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        worker_args = (
            workqueue,
            self.metadata_sm,
            self.metadata_type,
            self.fields,
            allocator,
            done_number,
            allocations_queue,
            *extra_worker_args,
        )
        processes = [Process(target=work_fn, args=worker_args) for _ in range(self.num_workers)]
        try:
            for process in processes:
                process.start()
            with tqdm(total=self.num_samples, desc=self.description, unit="img") as progress:
                previous = 0
                while previous != self.num_samples:
                    failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                    if failed:
                        raise BetonWriteError(f"a writer process exited with status {failed[0]}")
                    value = done_number.value
                    if value > previous:
                        progress.update(value - previous)
                    previous = value
                    sleep(0.05)
            allocation_list = []
            for _ in processes:
                allocation_list.extend(allocations_queue.get(timeout=600))
            for process in processes:
                process.join()
            self.finalize(allocation_list)
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
                    process.join()
            self.metadata_sm.close()
            self.metadata_sm.unlink()


def write_beton(
    path: str | os.PathLike,
    images,
    labels,
    *,
    jpeg: bool = False,
    jpeg_quality: int = JPEG_QUALITY,
    num_workers: int | None = None,
    dataset=None,
) -> Path:
    """Write images (N, R, R, 3 uint8) and int labels as `path`, atomically. `dataset` overrides the pair source.

    Raw pixels need one writer process (a copy per image); JPEG encoding gets up to 8.
    """
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if jpeg else 1
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    dataset = dataset if dataset is not None else _ArrayDataset(images, labels)
    resolution = int(images.shape[1]) if images is not None else None
    fields = {
        "image": RGBImageField(
            write_mode="jpg" if jpeg else "raw", max_resolution=resolution, jpeg_quality=jpeg_quality
        ),
        "label": IntField(),
    }
    writer = _CheckedWriter(str(tmp), fields, num_workers=max(1, num_workers))
    writer.description = path.name
    try:
        writer.from_indexed_dataset(dataset, chunksize=256)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (%d images)", path, len(dataset))
    return path


def read_beton(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All images (N, H, W, 3 uint8, equal sizes) and labels of a .beton, in stored order, without FFCV's loader."""
    reader = Reader(str(path))
    columns = dict(zip(reader.field_names, reader.metadata.dtype.names))
    image_meta = reader.metadata[columns["image"]]
    labels = np.asarray(reader.metadata[columns["label"]], dtype=np.int64)
    if len(labels) == 0:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8), labels
    height, width = int(image_meta["height"][0]), int(image_meta["width"][0])
    images = np.empty((len(labels), height, width, 3), dtype=np.uint8)
    sizes = {int(ptr): int(size) for ptr, size in zip(reader.alloc_table["ptr"], reader.alloc_table["size"])}
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    for index, record in enumerate(image_meta):
        pointer = int(record["data_ptr"])
        if record["mode"] == _JPG_MODE:
            encoded = raw[pointer : pointer + sizes[pointer]]
            images[index] = cv2.cvtColor(cv2.imdecode(np.asarray(encoded), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        else:
            images[index] = raw[pointer : pointer + height * width * 3].reshape(height, width, 3)
    return images, labels
