"""Seeded FFCV augmentation: random resized crop and horizontal flip that repeat exactly for a given seed and epoch.

FFCV 1.0.2's own crop and flip draw from an unseeded per-thread RNG, so two runs never see the
same crops. This decoder seeds numba's RNG per sample from (seed, epoch, sample index), which
makes the result independent of how samples are spread over threads. The flip happens inside
the decoder: one compiled stage instead of two halves the pipeline's numba compile time. The epoch lives in an
`EpochCell`: a one-element array the compiled pipeline reads through its address on every batch,
so the crops change from epoch to epoch without recompiling the pipeline.
"""

from __future__ import annotations

from typing import Callable

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

import torch

_torch_threads = torch.get_num_threads()
from ffcv.fields.rgb_image import (IMAGE_MODES, CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                   get_center_crop, get_random_crop)
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
torch.set_num_threads(_torch_threads)  # importing FFCV sets torch's thread count to 1

_SEED_MOD = 2**31 - 1
_NEVER_FREED: list = []


@intrinsic
def _as_voidptr(typingctx, address):
    """Turn an integer address into a void pointer inside numba code (to read an EpochCell)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


def _flip_in_place(image):
    """Mirror an HWC image left-right."""
    height, width, channels = image.shape
    for col in range(width // 2):
        mirror = width - 1 - col
        for row in range(height):
            for ch in range(channels):
                image[row, col, ch], image[row, mirror, ch] = image[row, mirror, ch], image[row, col, ch]


class EpochCell:
    """The current epoch, shared with compiled FFCV pipelines by memory address."""

    def __init__(self) -> None:
        self.array = np.zeros(1, dtype=np.int64)
        self.address = int(self.array.ctypes.data)

    def set(self, epoch: int) -> None:
        self.array[0] = int(epoch)

    def get(self) -> int:
        return int(self.array[0])


def _sample_seed(base, epoch_address, source_ix):
    """The RNG seed of one sample in the current epoch (read from the EpochCell at `epoch_address`)."""
    epoch = numba.carray(_as_voidptr(epoch_address), (1,), np.int64)[0]
    return ((base + epoch * 7_919_993) * 4 + source_ix * 97) % _SEED_MOD


class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCropRGBImageDecoder with per-sample seeding and an optional horizontal flip (p=0.5)."""

    def __init__(self, output_size, scale, ratio, *, seed: int, epoch: EpochCell, flip: bool = False):
        super().__init__(output_size, scale=tuple(scale), ratio=tuple(ratio))
        self.seed = int(seed)
        self.epoch = epoch
        self.flip = bool(flip)

    def generate_code(self) -> Callable:
        return _crop_decoder(self, get_random_crop, np.array(self.scale, dtype=np.float64),
                             np.array(self.ratio, dtype=np.float64), seed=self.seed, epoch=self.epoch, flip=self.flip)


class CenterCrop(CenterCropRGBImageDecoder):
    """FFCV's CenterCropRGBImageDecoder (same crop), sharing this module's decode loop."""

    def generate_code(self) -> Callable:
        return _crop_decoder(self, get_center_crop, np.zeros(2), float(self.ratio), seed=None, epoch=None, flip=False)


def _crop_decoder(op, get_crop, scale, ratio, *, seed, epoch, flip) -> Callable:
    """The decode loop of FFCV's ResizedCropRGBImageDecoder, plus per-sample seeding and an in-place flip.

    The compiled JPEG decoder is kept for the life of the process: when numba frees it, its
    dispatcher finalizer fails on its signature's key (a KeyError "Exception ignored").
    """
    jpg = IMAGE_MODES['jpg']
    mem_read = op.memory_read
    my_range = Compiler.get_iterator()
    imdecode_c = Compiler.compile(imdecode)
    _NEVER_FREED.append(imdecode_c)
    resize_crop_c = Compiler.compile(resize_crop)
    get_crop_c = Compiler.compile(get_crop)
    sample_seed = Compiler.compile(_sample_seed)
    flip_in_place = Compiler.compile(_flip_in_place)
    seeded = seed is not None
    seed_base = (int(seed) * 1_000_003) % _SEED_MOD if seeded else 0
    epoch_address = epoch.address if seeded else 0

    def decode(batch_indices, my_storage, metadata, storage_state):
        destination, temp_storage = my_storage
        for dst_ix in my_range(len(batch_indices)):
            source_ix = batch_indices[dst_ix]
            field = metadata[source_ix]
            image_data = mem_read(field['data_ptr'], storage_state)
            height = np.uint32(field['height'])
            width = np.uint32(field['width'])
            if field['mode'] == jpg:
                temp_buffer = temp_storage[dst_ix]
                imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                selected_size = 3 * height * width
                temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                temp_buffer = temp_buffer.reshape(height, width, 3)
            else:
                temp_buffer = image_data.reshape(height, width, 3)
            if seeded:
                np.random.seed(sample_seed(seed_base, epoch_address, source_ix))
            i, j, h, w = get_crop_c(height, width, scale, ratio)
            resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            if flip and np.random.random() < 0.5:
                flip_in_place(destination[dst_ix])
        return destination[:len(batch_indices)]

    decode.is_parallel = True
    return decode
