"""The FFCV loaders on a real .beton whose pixels encode each example: crops, flips, MixUp, order, sharding.

Image i (256 of them, 16x16) has label i % 10; channel 0 is the constant i, channel 1 the
constant 20 * label, channel 2 the column index * 16 (a ramp that shows flips and crops).
Loaders use one numba thread except the MixUp one, so the suite pays few parallel compiles.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mlpscale.data.loaders import eval_loader, train_loader, tta_loader
from mlpscale.errors import MlpscaleError

N, RES, BATCH = 256, 16, 64
MEAN, STD = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
RAMP = np.arange(RES, dtype=np.float32) * 16


def _image(i: int) -> np.ndarray:
    image = np.zeros((RES, RES, 3), np.uint8)
    image[:, :, 0] = i
    image[:, :, 1] = 20 * (i % 10)
    image[:, :, 2] = RAMP.astype(np.uint8)
    return image


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Encoded:
        def __len__(self):
            return N

        def __getitem__(self, i):
            return _image(i), i % 10

    path = tmp_path_factory.mktemp("beton") / "encoded.beton"
    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()}, num_workers=1)
    writer.from_indexed_dataset(Encoded())
    return path


def _raw(images: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: back to 0-255 pixel values."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images * std + mean).numpy()


def _ids(images: torch.Tensor) -> np.ndarray:
    raw = _raw(images)
    ids = np.rint(raw[:, 0, 0, 0]).astype(int)
    np.testing.assert_allclose(raw[:, 0], ids[:, None, None] * np.ones_like(raw[:, 0]), atol=1e-3)
    return ids


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


@pytest.fixture(scope="module")
def train(beton):
    return train_loader(
        beton, batch_size=BATCH, resolution=RES, mean=MEAN, std=STD, device="cpu", num_workers=1, seed=3
    )


def test_train_batches_are_normalised_cropped_flipped_and_follow_labels(train):
    assert len(train) == N // BATCH and train.num_examples == N
    batches = _epoch(train, 0)
    assert len(batches) == N // BATCH
    ids = []
    flipped = cropped = 0
    for batch in batches:
        assert batch.images.shape == (BATCH, 3, RES, RES) and batch.images.dtype == torch.float32
        assert batch.images.device.type == "cpu"
        assert batch.labels.shape == (BATCH,) and batch.labels.dtype == torch.int64
        assert batch.labels_mixed is None and batch.lam == 1.0
        batch_ids = _ids(batch.images)
        np.testing.assert_array_equal(batch.labels.numpy(), batch_ids % 10)
        # channel 1 is the constant 20 * label: normalisation is (x - mean) / std per channel
        expected = (20.0 * batch.labels.float() - MEAN[1]) / STD[1]
        torch.testing.assert_close(batch.images[:, 1], expected.view(-1, 1, 1).expand(-1, RES, RES))
        rows = _raw(batch.images)[:, 2, 0, :]
        steps = np.diff(rows, axis=1)
        rising, falling = (steps >= -1e-3).all(axis=1), (steps <= 1e-3).all(axis=1)
        assert (rising | falling).all()
        flipped += int((falling & ~rising).sum())
        cropped += int((np.abs(rows - RAMP).max(axis=1) > 1).sum() - (falling & ~rising).sum())
        ids.extend(batch_ids)
    assert sorted(ids) == list(range(N)), "one epoch visits every example once"
    assert ids != sorted(ids), "random order"
    assert 0.25 * N < flipped < 0.75 * N
    assert cropped > 0.25 * N


def test_train_epochs_replay_exactly_and_differ_from_each_other(train):
    first, again, second = _epoch(train, 0), _epoch(train, 0), _epoch(train, 1)
    for a, b in zip(first, again):
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
        torch.testing.assert_close(a.labels, b.labels, rtol=0, atol=0)
    assert not torch.equal(first[0].labels, second[0].labels)
    assert train.epoch == 2


def test_cpu_batches_are_made_in_the_consuming_thread_and_equal_prefetched_ones(beton, train):
    import threading

    assert train.prefetch is False, "on the CPU batches are made on demand"
    threads = threading.active_count()
    partial = iter(train)
    next(partial)
    assert threading.active_count() == threads, "no prefetch thread"
    partial.close()  # an abandoned epoch releases its memory; the next one starts afresh
    prefetched = train_loader(
        beton, batch_size=BATCH, resolution=RES, mean=MEAN, std=STD, device="cpu", num_workers=1, seed=3
    )
    prefetched.prefetch = True
    inline_batches, prefetched_batches = _epoch(train, 0), _epoch(prefetched, 0)
    assert len(inline_batches) == len(prefetched_batches) == N // BATCH
    for a, b in zip(inline_batches, prefetched_batches):
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
        torch.testing.assert_close(a.labels, b.labels, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_the_cpu_ones_made_ahead_or_on_demand(beton, train):
    """On a GPU FFCV copies each batch on its own stream: both ways must hand over finished batches."""
    cpu_batches = _epoch(train, 0)
    for prefetch in (True, False):
        loader = train_loader(
            beton, batch_size=BATCH, resolution=RES, mean=MEAN, std=STD, device="cuda", num_workers=1, seed=3
        )
        loader.prefetch = prefetch
        for _ in range(2):  # the second pass reuses the memory slots the first one filled
            batches = _epoch(loader, 0)
            assert len(batches) == len(cpu_batches)
            for a, b in zip(batches, cpu_batches):
                assert a.images.device.type == "cuda"
                torch.testing.assert_close(a.images.cpu(), b.images, rtol=0, atol=1e-5)
                torch.testing.assert_close(a.labels.cpu(), b.labels, rtol=0, atol=0)


def test_mixup_mixes_the_same_crops_as_an_unmixed_loader_with_the_same_seed(beton, train):
    """Two threads here, one in `train`: crops and flips do not depend on the thread count."""
    mixed_loader = train_loader(
        beton,
        batch_size=BATCH,
        resolution=RES,
        mean=MEAN,
        std=STD,
        device="cpu",
        num_workers=2,
        seed=3,
        mixup_alpha=0.4,
    )
    plain, mixed = _epoch(train, 0), _epoch(mixed_loader, 0)
    lams = []
    for p, m in zip(plain, mixed):
        torch.testing.assert_close(p.labels, m.labels, rtol=0, atol=0)
        assert 0.0 <= m.lam <= 1.0
        lams.append(m.lam)
        x, lam = p.images, m.lam
        # recover the partner of each row, then check the row is exactly lam * x + (1 - lam) * partner
        candidates = lam * x.unsqueeze(1) + (1 - lam) * x.unsqueeze(0)
        error = (candidates - m.images.unsqueeze(1)).flatten(2).abs().amax(dim=2)
        partner = error.argmin(dim=1)
        assert error.min(dim=1).values.max() < 1e-4
        assert sorted(partner.tolist()) == list(range(BATCH)), "partners form a permutation"
        torch.testing.assert_close(m.labels_mixed, p.labels[partner], rtol=0, atol=0)
    assert len(set(lams)) == len(lams) and any(lam < 0.99 for lam in lams)


def test_eval_covers_every_example_once_in_order_without_augmentation(beton):
    loader = eval_loader(beton, batch_size=100, resolution=RES, mean=MEAN, std=STD, device="cpu", num_workers=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(b.labels) for b in batches] == [100, 100, 56]
    images = torch.cat([b.images for b in batches])
    np.testing.assert_array_equal(_ids(images), np.arange(N))
    np.testing.assert_array_equal(torch.cat([b.labels for b in batches]).numpy(), np.arange(N) % 10)
    np.testing.assert_allclose(_raw(images)[:, 2], np.broadcast_to(RAMP, (N, RES, RES)), atol=1e-3)


def test_eval_upscales_to_a_larger_resolution(beton):
    loader = eval_loader(beton, batch_size=128, resolution=2 * RES, mean=MEAN, std=STD, device="cpu", num_workers=1)
    batch = next(iter(loader))
    assert batch.images.shape == (128, 3, 2 * RES, 2 * RES)
    np.testing.assert_array_equal(_ids(batch.images), np.arange(128))
    ramp = _raw(batch.images)[:, 2, 0, :]
    assert (np.diff(ramp, axis=1) >= -1e-3).all() and (ramp[:, -1] - ramp[:, 0] > 200).all()


def test_eval_decodes_jpeg_images(tmp_path):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Encoded:
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return _image(8 * i), i % 10

    path = tmp_path / "jpeg.beton"
    DatasetWriter(
        str(path), {"image": RGBImageField(write_mode="jpg", jpeg_quality=95), "label": IntField()}, num_workers=1
    ).from_indexed_dataset(Encoded())
    batch = next(
        iter(eval_loader(path, batch_size=32, resolution=RES, mean=MEAN, std=STD, device="cpu", num_workers=1))
    )
    assert batch.images.shape == (32, 3, RES, RES)
    np.testing.assert_allclose(_raw(batch.images)[:, 0, RES // 2, RES // 2], 8 * np.arange(32), atol=6)


def test_tta_passes_keep_file_order_draw_new_crops_and_replay(beton):
    loader = tta_loader(
        beton,
        batch_size=100,
        resolution=RES,
        mean=MEAN,
        std=STD,
        device="cpu",
        scale=(0.25, 1.0),
        ratio=(3 / 4, 4 / 3),
        seed=5,
        num_workers=1,
    )
    first, second = list(loader), list(loader)
    assert [len(b.labels) for b in first] == [100, 100, 56]
    np.testing.assert_array_equal(_ids(torch.cat([b.images for b in first])), np.arange(N))
    assert not torch.equal(first[0].images, second[0].images)
    replay = _epoch(loader, 0)
    torch.testing.assert_close(replay[0].images, first[0].images, rtol=0, atol=0)


def test_drop_last_and_orders_without_iterating(beton):
    common = dict(resolution=RES, mean=MEAN, std=STD, device="cpu", num_workers=1)
    dropped = train_loader(beton, batch_size=100, **common)
    kept = train_loader(beton, batch_size=100, drop_last=False, **common)
    assert (len(dropped), dropped.examples_per_epoch) == (2, 200)
    assert (len(kept), kept.examples_per_epoch) == (3, N)
    quasi = train_loader(beton, batch_size=BATCH, order="quasi_random", **common)
    order = np.asarray(quasi.ffcv_loader.next_traversal_order())
    assert len(quasi) == N // BATCH and sorted(order.tolist()) == list(range(N))


def test_user_errors_name_the_bad_value(beton, tmp_path):
    common = dict(batch_size=BATCH, resolution=RES, mean=MEAN, std=STD, device="cpu", num_workers=1)
    with pytest.raises(MlpscaleError, match="missing.beton"):
        train_loader(tmp_path / "missing.beton", **common)
    with pytest.raises(MlpscaleError, match="order='shuffled'"):
        train_loader(beton, order="shuffled", **common)
    with pytest.raises(MlpscaleError, match="distributed=True"):
        train_loader(beton, distributed=True, **common)
    with pytest.raises(MlpscaleError, match="mixup_alpha=-1"):
        train_loader(beton, mixup_alpha=-1, **common)
    with pytest.raises(MlpscaleError, match="scale"):
        train_loader(beton, scale=(0.5, 0.1), **common)
    with pytest.raises(MlpscaleError, match="batch_size=512"):
        train_loader(beton, **{**common, "batch_size": 512})


SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from mlpscale.data.loaders import train_loader, eval_loader
    rank, store, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    common = dict(resolution=16, mean=(0, 0, 0), std=(1, 1, 1), device="cpu", num_workers=1, distributed=True)
    train = train_loader(path, batch_size=32, seed=7, **common)
    evaluation = eval_loader(path, batch_size=32, **common)
    print(json.dumps({"train": [int(i) for i in train.ffcv_loader.next_traversal_order()],
                      "eval": [int(i) for i in evaluation.ffcv_loader.next_traversal_order()],
                      "len": len(train)}))
    dist.destroy_process_group()
""")


def test_distributed_ranks_read_disjoint_shards(beton, tmp_path):
    """Two real gloo ranks: FFCV's distributed order gives each its own half (the pipeline is not compiled)."""
    import json

    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", SHARD_SCRIPT, str(rank), str(store), str(beton)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    shards = []
    for process in ranks:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        shards.append(json.loads(out.strip().splitlines()[-1]))
    for kind in ("train", "eval"):
        a, b = (set(shard[kind]) for shard in shards)
        assert len(a) == len(b) == N // 2 and not a & b and a | b == set(range(N))
    assert shards[0]["len"] == shards[1]["len"] == N // 2 // 32


def _decoded(beton, decoder, batch_size=N):
    """One batch straight from an FFCV Loader around `decoder` (the accelerator path's uint8 output, on CPU)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(
        str(beton),
        batch_size=batch_size,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        pipelines={"image": [decoder, ToTensor()], "label": [IntDecoder(), ToTensor()]},
    )
    images, _ = next(iter(loader))
    return images.clone()


def test_accelerator_decoders_emit_the_uint8_pixels_the_cpu_decoders_normalise(beton):
    """The uint8 channels-first output an accelerator receives, against the normalised CPU output."""
    from mlpscale.data.augment import CenterCrop, EpochCell, SeededRandomResizedCrop

    plain = _decoded(beton, CenterCrop((RES, RES), ratio=1.0))
    assert plain.dtype == torch.uint8 and plain.shape == (N, 3, RES, RES)
    expected = np.stack([_image(i).transpose(2, 0, 1) for i in range(N)])
    np.testing.assert_array_equal(plain.numpy(), expected)

    crop = dict(scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), seed=11, flip=True)
    raw = _decoded(beton, SeededRandomResizedCrop((RES, RES), epoch=EpochCell(), **crop))
    normalised = _decoded(beton, SeededRandomResizedCrop((RES, RES), epoch=EpochCell(), normalize=(MEAN, STD), **crop))
    assert normalised.dtype == torch.float32
    np.testing.assert_allclose(_raw(normalised), raw.numpy().astype(np.float32), atol=1e-3)
    ramps = raw[:, 2, 0, :].numpy().astype(int)
    assert (np.diff(ramps, axis=1) < 0).any(axis=1).sum() > N // 4, "some crops are flipped"


def test_default_decoder_threads_leave_the_cpu_to_the_step():
    from mlpscale.data.loaders import default_threads

    assert default_threads("cpu", cpus=8) == 1
    assert default_threads(torch.device("cuda"), cpus=6) == 6
    assert default_threads("cuda") == max(1, torch.get_num_threads())


def test_zero_decoder_threads_is_refused(beton):
    with pytest.raises(MlpscaleError, match="num_workers=0"):
        eval_loader(beton, batch_size=BATCH, resolution=RES, mean=MEAN, std=STD, device="cpu", num_workers=0)


def test_fused_cpu_mixup_matches_the_torch_mixup_of_normalised_images():
    """`normalize_and_mix` (uint8 in, one compiled pass) against `__call__` on the normalised batch, same draws."""
    from mlpscale.data.augment import normalization_affine
    from mlpscale.data.mixup import MixUp

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.arange(48)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    scale, shift = normalization_affine(MEAN, STD)
    for epoch in range(3):
        fused, reference = MixUp(0.8, seed=4), MixUp(0.8, seed=4)
        fused.set_epoch(epoch), reference.set_epoch(epoch)
        mixed, labels_mixed, lam = fused.normalize_and_mix(images, labels, scale, shift)
        expected, expected_labels, expected_lam = reference((images.float() - mean) / std, labels)
        assert lam == expected_lam and mixed.dtype == torch.float32
        torch.testing.assert_close(labels_mixed, expected_labels, rtol=0, atol=0)
        torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-5)
        assert not torch.equal(labels_mixed, labels)


def test_ffcv_is_imported_without_a_numba_typed_dict_and_keeps_torchs_threads():
    """In a fresh interpreter: mlpscale's FFCV import leaves IMAGE_MODES a plain dict with FFCV's values,
    restores numba's typed Dict for everyone else, and torch's thread count as it was."""
    script = textwrap.dedent("""
        import torch
        torch.set_num_threads(2)
        import mlpscale.data.loaders, numba.typed, numba.typed.typeddict
        from ffcv.fields.rgb_image import IMAGE_MODES
        print(type(IMAGE_MODES).__name__, sorted(IMAGE_MODES.items()), numba.typed.Dict is numba.typed.typeddict.Dict,
              torch.get_num_threads())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "dict [('jpg', 0), ('raw', 1)] True 2"
