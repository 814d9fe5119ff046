"""FFCV loaders for training, evaluation and test-time augmentation, each declared as a list of ops per field.

On an accelerator, uint8 channels-first crops travel to the device (non_blocking) and are
normalised there with the dataset's mean and std (0-255 scale, from meta.json), then mixed (MixUp).
When the device is the CPU, the decoder threads write the normalised float32 crops directly (one
pass, no copy to a "device" that is the same memory); with MixUp on, they write uint8 crops instead
and one compiled pass normalises and mixes them. Iterating any loader yields
`Batch(images, labels, labels_mixed, lam)`. Crops, flips, order and MixUp all follow `seed` and
the epoch, so two loaders with the same seed give the same batches.

FFCV prepares batches ahead in a thread of its own, which keeps an accelerator fed. When the
device is the CPU the batches are made in the consuming thread instead, between training steps:
the step's threads own every core there, and without a thread beside them competing for the cores
the loader alone is 12-16% faster on 2 cores (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import mlpscale.data.ffcv_import  # noqa: F401  (first: before FFCV, the fast import that keeps torch's threads)

# isort: split

import logging
import os
import queue
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.transforms import Squeeze, ToDevice, ToTensor

from mlpscale.data.augment import CenterCrop, EpochCell, SeededRandomResizedCrop, normalization_affine
from mlpscale.data.choices import ORDERS
from mlpscale.data.host_memory import keep_freed_memory
from mlpscale.data.mixup import MixUp
from mlpscale.errors import MlpscaleError

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    """One batch on the device. Without MixUp, labels_mixed is None and lam is 1.0."""

    images: torch.Tensor
    labels: torch.Tensor
    labels_mixed: torch.Tensor | None
    lam: float


class MlpLoader:
    """An FFCV loader plus the device-side normalisation and MixUp; `len()` is batches per epoch.

    Each full pass advances the epoch by one (new order, crops, flips and MixUp draws);
    `set_epoch(e)` jumps to 0-based epoch `e`, e.g. when a run resumes from a checkpoint.
    `num_examples` is the number of examples in the .beton file; `examples_per_epoch` the
    number this loader (this rank, in distributed mode) yields in one pass. `prefetch`: batches
    made ahead in FFCV's thread (default: off the CPU) or on demand in the consuming thread.
    """

    def __init__(
        self,
        ffcv_loader,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        epoch_cell: EpochCell,
        normalized_by_decoder: bool,
        mixup: MixUp | None = None,
        prefetch: bool | None = None,
    ) -> None:
        self.ffcv_loader = ffcv_loader
        self.device = torch.device(device)
        self.prefetch = self.device.type != "cpu" if prefetch is None else bool(prefetch)
        self.mean = _channel_tensor(mean, self.device)
        self.std = _channel_tensor(std, self.device)
        self.normalized_by_decoder = normalized_by_decoder
        self.mixup = mixup if mixup is not None and mixup.enabled else None
        self.affine = normalization_affine(mean, std)  # the CPU MixUp pass normalises with it
        self.epoch_cell = epoch_cell
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self.ffcv_loader.batch_size

    @property
    def num_examples(self) -> int:
        return int(self.ffcv_loader.reader.num_samples)

    @property
    def examples_per_epoch(self) -> int:
        n = len(self.ffcv_loader.first_traversal_order)
        return len(self) * self.batch_size if self.ffcv_loader.drop_last else n

    def __len__(self) -> int:
        return len(self.ffcv_loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) on the device -> float32 `(x - mean) / std` (a new tensor)."""
        return images_uint8.float().sub_(self.mean).div_(self.std)

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.normalized_by_decoder else self.normalize(images)

    def _mixed(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        if images.device.type == "cpu" and not self.normalized_by_decoder:
            return self.mixup.normalize_and_mix(images, labels, *self.affine)
        return self.mixup(self._images(images), labels)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch_cell.set(epoch)
        self.ffcv_loader.next_epoch = epoch
        if self.mixup is not None:
            self.mixup.set_epoch(epoch)
        torch_threads = torch.get_num_threads()
        iterator = _epoch(self.ffcv_loader, _PrefetchEpoch if self.prefetch else _InlineEpoch)
        self.epoch = epoch + 1
        try:
            for step, (images, labels) in enumerate(iterator.batches()):
                if step == 0:  # FFCV sets torch's thread count to its decoder threads' before the first batch
                    torch.set_num_threads(torch_threads)
                labels = labels.to(torch.int64, copy=True)  # FFCV reuses its label buffers
                if self.mixup is not None:
                    images, labels_mixed, lam = self._mixed(images, labels)
                    yield Batch(images, labels, labels_mixed, lam)
                else:
                    yield Batch(self._images(images), labels, None, 1.0)
        finally:
            iterator.stop()


def train_loader(
    path,
    *,
    batch_size: int,
    resolution: int,
    mean,
    std,
    device,
    num_workers: int | None = None,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    flip: bool = True,
    mixup_alpha: float = 0.0,
    seed: int = 0,
    order: str = "random",
    distributed: bool = False,
    drop_last: bool = True,
) -> MlpLoader:
    """Random resized crop and flip -> device -> normalise -> MixUp, in random or quasi-random order."""
    _check_scale_ratio(scale, ratio)
    mixup = MixUp(mixup_alpha, seed=seed)
    epoch = EpochCell()
    decoder = SeededRandomResizedCrop(
        (resolution, resolution),
        scale,
        ratio,
        seed=seed,
        epoch=epoch,
        flip=flip,
        normalize=_decoder_normalization(mean, std, device, mixup.enabled),
    )
    loader = _ffcv_loader(
        path,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        decoder=decoder,
        order=order,
        seed=seed,
        distributed=distributed,
        drop_last=drop_last,
    )
    return MlpLoader(
        loader,
        mean=mean,
        std=std,
        device=device,
        epoch_cell=epoch,
        normalized_by_decoder=decoder.normalized,
        mixup=mixup,
    )


def eval_loader(
    path,
    *,
    batch_size: int,
    resolution: int,
    mean,
    std,
    device,
    num_workers: int | None = None,
    distributed: bool = False,
) -> MlpLoader:
    """Centre crop (the whole square image) resized to `resolution`, every example once, in file order."""
    decoder = CenterCrop((resolution, resolution), ratio=1.0, normalize=_decoder_normalization(mean, std, device))
    loader = _ffcv_loader(
        path,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        decoder=decoder,
        order="sequential",
        seed=0,
        distributed=distributed,
        drop_last=False,
    )
    return MlpLoader(
        loader, mean=mean, std=std, device=device, epoch_cell=EpochCell(), normalized_by_decoder=decoder.normalized
    )


def tta_loader(
    path,
    *,
    batch_size: int,
    resolution: int,
    mean,
    std,
    device,
    scale,
    ratio,
    seed: int = 0,
    flip: bool = True,
    num_workers: int | None = None,
    distributed: bool = False,
) -> MlpLoader:
    """Test-time augmentation: seeded random resized crops (and flips) in file order, no example dropped.

    Each pass over the loader draws new crops (pass k = epoch k), reproducibly for a given seed,
    so averaging the logits of K passes is the K-view TTA estimate.
    """
    _check_scale_ratio(scale, ratio)
    epoch = EpochCell()
    decoder = SeededRandomResizedCrop(
        (resolution, resolution),
        scale,
        ratio,
        seed=seed,
        epoch=epoch,
        flip=flip,
        normalize=_decoder_normalization(mean, std, device),
    )
    loader = _ffcv_loader(
        path,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        decoder=decoder,
        order="sequential",
        seed=seed,
        distributed=distributed,
        drop_last=False,
    )
    return MlpLoader(
        loader, mean=mean, std=std, device=device, epoch_cell=epoch, normalized_by_decoder=decoder.normalized
    )


def _ffcv_loader(path, *, batch_size, device, num_workers, decoder, order, seed, distributed, drop_last):
    """The FFCV Loader with the given channels-first image decoder, then (off the CPU) the copy to the device."""
    path = Path(path)
    if not path.is_file():
        raise MlpscaleError(
            f"dataset file {path} does not exist; create it with "
            f"`python jobs/prepare_data.py DATASET --data-dir DIR --resolution R`"
        )
    if batch_size < 1:
        raise MlpscaleError(f"batch_size={batch_size} must be at least 1")
    if order not in ORDERS:
        raise MlpscaleError(f"order={order!r} is not one of {', '.join(ORDERS)}")
    if order == "quasi_random" and distributed:
        raise MlpscaleError("order='quasi_random' is not supported with several workers (FFCV); use order='random'")
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise MlpscaleError(
            "distributed=True needs an initialised torch.distributed process group "
            "(Ray Train sets one up with several workers); use distributed=False"
        )
    device = torch.device(device)
    num_workers = default_threads(device) if num_workers is None else int(num_workers)
    if num_workers < 1:
        raise MlpscaleError(f"num_workers={num_workers} must be at least 1 decoder thread (or None for the default)")
    if device.type == "cpu":
        keep_freed_memory()  # each CPU batch is a new float tensor (decoder or MixUp pass); keep freed blocks for it
    to_device = [] if device.type == "cpu" else [ToDevice(device, non_blocking=True)]
    pipelines = {"image": [decoder, ToTensor(), *to_device], "label": [IntDecoder(), ToTensor(), Squeeze(), *to_device]}
    ffcv_order = {
        "random": OrderOption.RANDOM,
        "quasi_random": OrderOption.QUASI_RANDOM,
        "sequential": OrderOption.SEQUENTIAL,
    }[order]
    # QUASI_RANDOM exists to read page by page from a process-private cache; the rest use the OS page cache.
    os_cache = order != "quasi_random"
    torch_threads = torch.get_num_threads()
    try:
        loader = Loader(
            os.fspath(path),
            batch_size=batch_size,
            num_workers=num_workers,
            order=ffcv_order,
            os_cache=os_cache,
            distributed=distributed,
            seed=seed,
            drop_last=drop_last,
            pipelines=pipelines,
        )
    finally:
        torch.set_num_threads(torch_threads)
    if len(loader) == 0:
        raise MlpscaleError(
            f"batch_size={batch_size} is larger than the {loader.reader.num_samples} examples "
            f"{path} holds per rank; lower batch_size"
        )
    log.debug("loader %s: %d batches of %d, order %s", path.name, len(loader), batch_size, order)
    return loader


def _epoch(loader, kind: type[EpochIterator]) -> EpochIterator:
    """One FFCV epoch as FFCV's `Loader.__iter__` makes it (ffcv 1.0.2), as an EpochIterator of class `kind`."""
    Compiler.set_num_threads(loader.num_workers)  # numba's threads for the pipeline (and torch's)
    order = loader.next_traversal_order()
    loader.next_epoch += 1
    if loader.code is None or loader.recompile:
        loader.generate_code()
    return kind(loader, order[: len(loader) * loader.batch_size])


class _PrefetchEpoch(EpochIterator):
    """FFCV's epoch thread making batches ahead, except that on a GPU a slot's pinned host memory is refilled
    only after the slot's last copy to the device has run: FFCV alone waits for it on the device, not on the
    host, and a host running steps ahead of the GPU could overwrite a batch before it was copied."""

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        if IS_CUDA:
            self.cuda_streams[batch_slot].synchronize()
        return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)

    def batches(self) -> Iterator[tuple]:
        """FFCV's `__next__`, but an error in the pipeline thread raises here instead of hanging."""
        while True:
            try:
                item = self.output_queue.get(timeout=1.0)
            except queue.Empty:
                if not self.is_alive():
                    raise RuntimeError(
                        f"the FFCV pipeline of {self.loader.fname} stopped without finishing the "
                        "epoch; its error is printed above"
                    ) from None
                continue
            if item is None:
                return
            yield self._handed_over(*item)

    def _handed_over(self, slot: int, result: tuple) -> tuple:
        if IS_CUDA:  # FFCV copies to the device on the slot's stream
            self.current_stream.wait_stream(self.cuda_streams[slot])
        return result

    def stop(self) -> None:
        """Stop the thread, then release its memory (an abandoned epoch's thread runs on otherwise).

        The thread gives up on a full queue after 0.5 s once told to stop, but its end-of-epoch marker
        waits for a free slot, so a slot is freed every second until it exits.
        """
        self.terminate_event.set()
        self.join(timeout=1.0)
        while self.is_alive():
            try:
                self.output_queue.get_nowait()
            except queue.Empty:
                pass
            self.join(timeout=1.0)
        self.close()


class _InlineEpoch(_PrefetchEpoch):
    """The same epoch without a thread: `batches()` runs the pipeline as each batch is asked for."""

    def start(self) -> None:  # EpochIterator.__init__ starts its thread here
        pass

    def batches(self) -> Iterator[tuple]:
        slots = self.loader.batches_ahead + 2  # the memory slots FFCV allocated for an epoch
        for index, indices in enumerate(self.iter_ixes):
            slot, consumed = index % slots, None
            if IS_CUDA:  # the slot's device buffer is rewritten after the consumer's work queued so far
                consumed = torch.cuda.Event()
                consumed.record(self.current_stream)
            yield self._handed_over(slot, self.run_pipeline(index, indices, slot, consumed))

    def stop(self) -> None:
        self.close()


def default_threads(device, cpus: int | None = None) -> int:
    """Decoder threads when none are asked for: 1 on the CPU, where the training step's threads own the cores
    (more decoder threads make the step wait at its thread barriers; benchmarks/RESULTS.md), else `cpus`
    (default: torch's thread count) to keep an accelerator fed."""
    if torch.device(device).type == "cpu":
        return 1
    return max(1, int(cpus or torch.get_num_threads()))


def _decoder_normalization(mean, std, device, mixup: bool = False) -> tuple[list[float], list[float]] | None:
    """Checked (mean, std) for a decoder that normalises, None for one that emits uint8.

    The decoder threads normalise on the CPU, unless MixUp follows: then the fused uint8 pass of
    `MixUp.normalize_and_mix` normalises while it mixes. An accelerator gets uint8 and normalises itself.
    """
    mean, std = _channel_values(mean, "mean"), _channel_values(std, "std")
    if min(std) <= 0:
        raise MlpscaleError(f"std={std} has a non-positive channel; re-run prepare_data to rebuild meta.json")
    return (mean, std) if torch.device(device).type == "cpu" and not mixup else None


def _channel_values(values, name: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != 3:
        raise MlpscaleError(f"{name}={values} must have 3 channel values (RGB, 0-255 scale), as in meta.json")
    return values


def _channel_tensor(values, device: torch.device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device).view(1, 3, 1, 1)


def _check_scale_ratio(scale, ratio) -> None:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise MlpscaleError(
            f"crop scale={tuple(scale)} must be (low, high) with 0 < low <= high <= 1, e.g. (0.08, 1.0)"
        )
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise MlpscaleError(f"crop ratio={tuple(ratio)} must be (low, high) with 0 < low <= high, e.g. (0.75, 1.333)")
