"""Seeded FFCV augmentations: random resized crop and horizontal flip that repeat exactly for a given seed and epoch.

FFCV 1.0.2's own crop and flip draw from an unseeded per-thread RNG, so two runs never see the
same crops. These ops seed numba's RNG per sample from (seed, epoch, sample index, salt), which
makes the result independent of how samples are spread over threads. The epoch lives in an
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

from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
from ffcv.transforms import RandomHorizontalFlip

_SEED_MOD = 2**31 - 1
_CROP_SALT = 0
_FLIP_SALT = 1


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


def _sample_seed_fn(seed: int, address: int, salt: int) -> Callable:
    """A numba function mapping a sample index to the RNG seed of that sample in the current epoch."""
    base = (int(seed) * 1_000_003) % _SEED_MOD

    def sample_seed(source_ix):
        epoch = numba.carray(_as_voidptr(address), (1,), np.int64)[0]
        return ((base + epoch * 7_919_993) * 4 + salt + source_ix * 97) % _SEED_MOD

    return Compiler.compile(sample_seed)


class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCropRGBImageDecoder with per-sample seeding (see module docstring)."""

    def __init__(self, output_size, scale, ratio, *, seed: int, epoch: EpochCell):
        super().__init__(output_size, scale=tuple(scale), ratio=tuple(ratio))
        self.seed = int(seed)
        self.epoch = epoch

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES['jpg']
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(get_random_crop)
        sample_seed = _sample_seed_fn(self.seed, self.epoch.address, _CROP_SALT)
        scale = np.array(self.scale, dtype=np.float64)
        ratio = np.array(self.ratio, dtype=np.float64)

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
                    imdecode_c(image_data, temp_buffer, height, width, height, width,
                               0, 0, 1, 1, False, False)
                    selected_size = 3 * height * width
                    temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                    temp_buffer = temp_buffer.reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                np.random.seed(sample_seed(source_ix))
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededRandomHorizontalFlip(RandomHorizontalFlip):
    """FFCV's RandomHorizontalFlip (on HWC uint8 arrays) with per-sample seeding."""

    def __init__(self, *, seed: int, epoch: EpochCell, flip_prob: float = 0.5):
        super().__init__(flip_prob)
        self.seed = int(seed)
        self.epoch = epoch

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        flip_prob = self.flip_prob
        sample_seed = _sample_seed_fn(self.seed, self.epoch.address, _FLIP_SALT)

        def flip(images, dst, indices):
            for i in my_range(images.shape[0]):
                np.random.seed(sample_seed(indices[i]))
                if np.random.random() < flip_prob:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        flip.is_parallel = True
        flip.with_indices = True
        return flip
