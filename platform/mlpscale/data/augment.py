"""Seeded FFCV image decoders: random resized crop and flip that repeat exactly for a given seed and epoch.

FFCV 1.0.2's own crop and flip draw from an unseeded per-thread RNG, so two runs never see the
same crops. These decoders draw each sample's crop and flip from a counter-based hash of
(seed, epoch, sample index) (splitmix64), which makes the result independent of how samples are
spread over threads and costs no RNG state to seed. The epoch lives in an `EpochCell`: a
one-element array the compiled pipeline reads through its address on every batch, so the crops
change from epoch to epoch without recompiling the pipeline.

Each decoder does the whole per-image job in one compiled pass: read (or JPEG-decode) the stored
image, resize the crop with FFCV's OpenCV kernel (INTER_AREA), then write it channels-first,
mirrored when flipped, either as uint8 (for an accelerator, which normalises on its side) or
already normalised to float32 (when the device is the CPU, whose cores run these threads anyway).
No separate flip, permute or copy stage follows.
"""

from __future__ import annotations

import mlpscale.data.ffcv_import  # noqa: F401  (first: before FFCV, the fast import that keeps torch's threads)

# isort: split

from collections.abc import Callable, Sequence
from dataclasses import replace

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_NEVER_FREED: list = []
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 1.0 / float(1 << 53)
_jit = numba.njit(fastmath=True, nogil=True, error_model="numpy")  # FFCV's compile options


@intrinsic
def _as_voidptr(typingctx, address):
    """Turn an integer address into a void pointer inside numba code (to read an EpochCell)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


class EpochCell:
    """The current epoch, shared with compiled FFCV pipelines by memory address."""

    def __init__(self) -> None:
        self.array = np.zeros(1, dtype=np.int64)
        self.address = int(self.array.ctypes.data)

    def set(self, epoch: int) -> None:
        self.array[0] = int(epoch)

    def get(self) -> int:
        return int(self.array[0])


@_jit
def _splitmix64(x):
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@_jit
def _uniform(key, k):
    """The k-th uniform number in [0, 1) of the stream named by `key`."""
    return float(_splitmix64(key + np.uint64(k) * _GOLDEN) >> np.uint64(11)) * _TO_UNIT


@_jit
def _sample_key(seed, epoch_address, source_ix):
    """The stream key of one sample in the current epoch (read from the EpochCell at `epoch_address`)."""
    epoch = numba.carray(_as_voidptr(epoch_address), (1,), np.int64)[0]
    key = _splitmix64(np.uint64(seed) ^ _splitmix64(np.uint64(epoch)))
    return _splitmix64(key ^ np.uint64(source_ix))


@_jit
def _random_crop(height, width, scale, log_ratio, key):
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws them, from stream `key`.

    Draws 0-19 are the ten (area, aspect) attempts, 20-21 the position; 22 is the flip's.
    """
    area = height * width
    for attempt in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * _uniform(key, 2 * attempt))
        aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * _uniform(key, 2 * attempt + 1))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(_uniform(key, 20) * (height - h + 1))
            j = int(_uniform(key, 21) * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    ratio_low, ratio_high = np.exp(log_ratio[0]), np.exp(log_ratio[1])
    if in_ratio < ratio_low:
        w, h = width, int(round(width / ratio_low))
    elif in_ratio > ratio_high:
        w, h = int(round(height * ratio_high)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@_jit
def _center_crop(height, width, ratio):
    """FFCV's centre crop: a square of `ratio` times the shorter side."""
    size = int(ratio * min(height, width))
    return (height - size) // 2, (width - size) // 2, size, size


@_jit
def _as_uint8(value, scale, shift):
    return value


@_jit
def _as_normalized(value, scale, shift):
    return np.float32(value) * scale + shift


def _chw_writer(convert):
    """A compiled HWC uint8 -> CHW copy applying `convert` per value, mirrored left-right when `flip`.

    Written as three channel stores per source pixel so LLVM vectorises the stride-3 reads.
    """

    @_jit
    def write(source, destination, flip, scale, shift):
        height, width, _ = source.shape
        lines = source.reshape(height, width * 3)
        for row in range(height):
            line = lines[row]
            out0, out1, out2 = destination[0, row], destination[1, row], destination[2, row]
            for col in range(width):
                base = 3 * (width - 1 - col) if flip else 3 * col
                out0[col] = convert(line[base], scale[0], shift[0])
                out1[col] = convert(line[base + 1], scale[1], shift[1])
                out2[col] = convert(line[base + 2], scale[2], shift[2])

    return write


_write_chw_uint8 = _chw_writer(_as_uint8)
_write_chw_normalized = _chw_writer(_as_normalized)  # (x - mean) / std as x * (1 / std) + (-mean / std)


def normalization_affine(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """`(x - mean) / std` as `x * scale + shift`: per-channel float32 (scale, shift) = (1 / std, -mean / std)."""
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    return (1.0 / std).astype(np.float32), (-mean / std).astype(np.float32)


class _ChannelsFirstDecoder:
    """Declares the channels-first output (uint8, or float32 when normalising) and a per-sample resize buffer.

    `normalize=(mean, std)` on the 0-255 scale makes the decoder emit `(x - mean) / std`; None emits uint8.
    """

    def _set_output(self, normalize: tuple[Sequence[float], Sequence[float]] | None) -> None:
        self.normalized = normalize is not None
        if self.normalized:
            self.scale_per_channel, self.shift_per_channel = normalization_affine(*normalize)
        else:
            self.scale_per_channel = np.ones(3, np.float32)
            self.shift_per_channel = np.zeros(3, np.float32)

    def declare_state_and_memory(self, previous_state):
        self.max_width = np.uint64(self.metadata["width"].max())
        self.max_height = np.uint64(self.metadata["height"].max())
        height, width = self.output_size
        dtype = np.dtype("<f4") if self.normalized else np.dtype("<u1")
        output_shape = (3, height, width)
        # normalised batches are allocated fresh per batch (see _fresh_output), so their slots stay tiny
        slot_shape = (1,) if self.normalized else output_shape
        return (
            replace(previous_state, jit_mode=True, shape=output_shape, dtype=dtype),
            (
                AllocationQuery(slot_shape, dtype),
                AllocationQuery((self.max_height * self.max_width * np.uint64(3),), np.dtype("<u1")),
                AllocationQuery((height, width, 3), np.dtype("<u1")),
            ),
        )


class SeededRandomResizedCrop(_ChannelsFirstDecoder, RandomResizedCropRGBImageDecoder):
    """Random resized crop (torchvision's draw) plus an optional horizontal flip (p=0.5), seeded per sample."""

    def __init__(self, output_size, scale, ratio, *, seed: int, epoch: EpochCell, flip: bool = False, normalize=None):
        super().__init__(output_size, scale=tuple(scale), ratio=tuple(ratio))
        self.seed = int(seed)
        self.epoch = epoch
        self.flip = bool(flip)
        self._set_output(normalize)

    def generate_code(self) -> Callable:
        scale = np.array(self.scale, dtype=np.float64)
        log_ratio = np.log(np.array(self.ratio, dtype=np.float64))
        seed, epoch_address, flip = np.uint64(self.seed), self.epoch.address, self.flip

        def crop_and_flip(height, width, source_ix):
            key = _sample_key(seed, epoch_address, source_ix)
            i, j, h, w = _random_crop(height, width, scale, log_ratio, key)
            return i, j, h, w, flip and _uniform(key, 22) < 0.5

        return _decode_loop(self, Compiler.compile(crop_and_flip))


class CenterCrop(_ChannelsFirstDecoder, CenterCropRGBImageDecoder):
    """FFCV's CenterCropRGBImageDecoder (same crop), written channels-first like the random one."""

    def __init__(self, output_size, ratio: float, *, normalize=None):
        super().__init__(output_size, ratio)
        self._set_output(normalize)

    def generate_code(self) -> Callable:
        ratio = float(self.ratio)

        def crop_and_flip(height, width, source_ix):
            i, j, h, w = _center_crop(height, width, ratio)
            return i, j, h, w, False

        return _decode_loop(self, Compiler.compile(crop_and_flip))


def _slot_output(slots, count):
    return slots[:count]


def _fresh_output(output_size):
    """A new float32 batch per call: it outlives the next batch, as the tensors a loader yields must."""
    height, width = output_size

    def fresh_output(slots, count):
        return np.empty((count, 3, height, width), np.float32)

    return fresh_output


def _decode_loop(op, crop_and_flip) -> Callable:
    """The per-batch loop of FFCV's ResizedCropRGBImageDecoder, writing channels-first in the same pass.

    The compiled JPEG decoder is kept for the life of the process: when numba frees it, its
    dispatcher finalizer fails on its signature's key (a KeyError "Exception ignored").
    """
    jpg = IMAGE_MODES["jpg"]
    mem_read = op.memory_read
    my_range = Compiler.get_iterator()
    imdecode_c = Compiler.compile(imdecode)
    _NEVER_FREED.append(imdecode_c)
    resize_crop_c = Compiler.compile(resize_crop)
    write = _write_chw_normalized if op.normalized else _write_chw_uint8
    scale, shift = op.scale_per_channel, op.shift_per_channel
    output = Compiler.compile(_fresh_output(op.output_size) if op.normalized else _slot_output)

    def decode(batch_indices, my_storage, metadata, storage_state):
        slots, temp_storage, resized = my_storage
        destination = output(slots, len(batch_indices))
        for dst_ix in my_range(len(batch_indices)):
            source_ix = batch_indices[dst_ix]
            field = metadata[source_ix]
            image_data = mem_read(field["data_ptr"], storage_state)
            height = np.uint32(field["height"])
            width = np.uint32(field["width"])
            if field["mode"] == jpg:
                temp_buffer = temp_storage[dst_ix]
                imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                selected_size = 3 * height * width
                temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                temp_buffer = temp_buffer.reshape(height, width, 3)
            else:
                temp_buffer = image_data.reshape(height, width, 3)
            i, j, h, w, flipped = crop_and_flip(np.int64(height), np.int64(width), source_ix)
            resize_crop_c(temp_buffer, i, i + h, j, j + w, resized[dst_ix])
            write(resized[dst_ix], destination[dst_ix], flipped, scale, shift)
        return destination

    decode.is_parallel = True
    return decode
