"""Dataset conversion: fixtures in each real source format -> .beton -> read back and checked."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from mlpscale.data import sources
from mlpscale.data.beton import BetonWriteError, read_beton, write_beton
from mlpscale.data.meta import load_meta
from mlpscale.data.prepare import add_subsets, prepare_dataset
from mlpscale.data.sources import Source, SplitSource
from mlpscale.data.subsets import nested_order, subset_indices
from mlpscale.errors import MlpscaleError

REPO = Path(__file__).resolve().parents[1]


def load_with_ffcv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every image and label of a .beton through FFCV's own Loader (CPU, sequential)."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(
        str(path),
        batch_size=64,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]},
    )
    images, labels = [], []
    for image_batch, label_batch in loader:
        images.append(np.array(image_batch))
        labels.append(np.array(label_batch).reshape(-1))
    return np.concatenate(images), np.concatenate(labels)


def leftovers(directory: Path) -> list[str]:
    """Temporary or staging files a conversion must not leave behind."""
    return sorted(p.name for p in directory.rglob("*") if ".tmp-" in p.name or ".stage-" in p.name)


def planar(images: np.ndarray) -> np.ndarray:
    """(N, R, R, 3) -> rows of 3*R*R channel-planar values, the CIFAR and downsampled-ImageNet layout."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def check_subset_contents(directory: Path, sizes: list[int]) -> None:
    """Each subset holds exactly train[subset_indices]; subsets nest and follow the class proportions."""
    train_images, train_labels = read_beton(directory / "train.beton")
    class_share = np.bincount(train_labels) / len(train_labels)
    previous = set()
    for size in sorted(sizes):
        indices = subset_indices(train_labels, size)
        images, labels = read_beton(directory / f"train_n{size}.beton")
        assert len(labels) == size
        np.testing.assert_array_equal(labels, train_labels[indices])
        np.testing.assert_array_equal(images, train_images[indices])
        assert previous <= set(indices.tolist())
        previous = set(indices.tolist())
        per_class = np.bincount(labels, minlength=len(class_share))
        assert np.all(np.abs(per_class - size * class_share) <= 1.0 + 1e-9), per_class


# --- digits (the default dataset of every job) ----------------------------------------------


def test_digits_default_needs_no_source(digits_dir):
    directory = digits_dir / "digits" / "res16"
    meta = load_meta(directory)
    assert meta["dataset"] == "digits" and meta["num_classes"] == 10 and meta["resolution"] == 16
    assert meta["classes"] == [str(d) for d in range(10)]
    assert meta["counts"]["train"] + meta["counts"]["test"] == 1797
    assert meta["counts"]["train_n300"] == 300 and meta["subsets"] == [300, 600]
    assert meta["skipped"] == []
    images, labels = read_beton(directory / "train.beton")
    assert images.shape == (meta["counts"]["train"], 16, 16, 3)
    assert np.array_equal(images[..., 0], images[..., 2])  # grayscale spread to RGB
    np.testing.assert_allclose(meta["mean"], images.reshape(-1, 3).mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(meta["std"], images.reshape(-1, 3).std(axis=0), rtol=1e-6)
    # stratified split: every class in test at about the train share
    test_labels = read_beton(directory / "test.beton")[1]
    assert np.all(np.abs(np.bincount(test_labels) / len(test_labels) - np.bincount(labels) / len(labels)) < 0.02)
    check_subset_contents(directory, [300, 600])


def test_reconvert_keeps_files_and_adds_missing_subsets(digits_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits_dir / "digits", root / "digits")
    directory = root / "digits" / "res16"
    before = {name: (directory / name).stat().st_mtime_ns for name in ("train.beton", "test.beton", "train_n300.beton")}
    prepare_dataset("digits", data_dir=root, resolution=16, n_train=[300, 450])
    assert {name: (directory / name).stat().st_mtime_ns for name in before} == before
    meta = load_meta(directory)
    assert meta["subsets"] == [300, 450, 600] and meta["counts"]["train_n450"] == 450
    check_subset_contents(directory, [300, 450, 600])
    assert add_subsets("digits", 16, [450], data_dir=root) == [directory / "train_n450.beton"]
    with pytest.raises(MlpscaleError, match="larger than the train split"):
        add_subsets("digits", 16, [10**6], data_dir=root)
    assert leftovers(root) == []


def test_nested_order_prefixes_are_class_proportional():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    order = nested_order(labels)
    assert sorted(order.tolist()) == list(range(100))
    assert np.array_equal(order, nested_order(labels))  # seeded
    for size in (1, 7, 10, 33, 64, 99, 100):
        counts = np.bincount(labels[order[:size]], minlength=3)
        assert np.all(np.abs(counts - size * np.array([0.5, 0.3, 0.2])) <= 1.0), (size, counts)


# --- CIFAR ---------------------------------------------------------------------------------


def _pickled(obj: dict) -> bytes:
    return pickle.dumps(obj, protocol=2)


def test_cifar10_targz_round_trips_raw_pixels(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"class{i}".encode() for i in range(10)]
    members = {"batches.meta": _pickled({b"label_names": names, b"num_cases_per_batch": 8, b"num_vis": 3072})}
    train_images, train_labels = [], []
    for batch in range(1, 6):
        images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, 8).tolist()
        train_images.append(images)
        train_labels += labels
        members[f"data_batch_{batch}"] = _pickled(
            {
                b"batch_label": f"training batch {batch} of 5".encode(),
                b"labels": labels,
                b"data": planar(images),
                b"filenames": [f"img{batch}_{i}.png".encode() for i in range(8)],
            }
        )
    test_images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    test_labels = [0, 1, 2, 3, 4, 5]
    members["test_batch"] = _pickled(
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": test_labels,
            b"data": planar(test_images),
            b"filenames": [b"t.png"] * 6,
        }
    )
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

    directory = prepare_dataset("cifar10", source=archive, data_dir=tmp_path / "data")
    assert directory == tmp_path / "data" / "cifar10" / "res32"
    meta = load_meta(directory)
    assert meta["classes"] == [n.decode() for n in names] and meta["num_classes"] == 10
    assert meta["counts"] == {"train": 40, "test": 6} and meta["image_format"] == "raw"
    images, labels = load_with_ffcv(directory / "train.beton")
    np.testing.assert_array_equal(images, np.concatenate(train_images))
    np.testing.assert_array_equal(labels, train_labels)
    images, labels = load_with_ffcv(directory / "test.beton")
    np.testing.assert_array_equal(images, test_images)
    np.testing.assert_array_equal(labels, test_labels)
    assert leftovers(tmp_path) == []


def test_cifar100_folder_resized_with_subsets(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine_names = [f"fine{i}".encode() for i in range(20)]
    (folder / "meta").write_bytes(_pickled({b"fine_label_names": fine_names, b"coarse_label_names": [b"c0"]}))
    train_images = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    train_labels = np.repeat(np.arange(20), 3)
    rng.shuffle(train_labels)
    test_images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, np.arange(20))):
        (folder / name).write_bytes(
            _pickled(
                {
                    b"filenames": [b"x.png"] * len(labels),
                    b"batch_label": name.encode(),
                    b"fine_labels": labels.tolist(),
                    b"coarse_labels": [0] * len(labels),
                    b"data": planar(images),
                }
            )
        )

    directory = prepare_dataset(
        "cifar100", source=tmp_path, data_dir=tmp_path / "data", resolution=16, n_train=[20, 40]
    )
    meta = load_meta(directory)
    assert meta["num_classes"] == 20 and meta["classes"][3] == "fine3" and meta["resolution"] == 16
    assert meta["counts"] == {"train": 60, "test": 20, "train_n20": 20, "train_n40": 40}
    images, labels = read_beton(directory / "train.beton")
    assert images.shape == (60, 16, 16, 3)
    np.testing.assert_array_equal(labels, train_labels)
    expected = np.stack([cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA) for image in train_images])
    np.testing.assert_array_equal(images, expected)
    check_subset_contents(directory, [20, 40])
    with pytest.raises(MlpscaleError, match="larger than the train split"):
        prepare_dataset("cifar100", source=tmp_path, data_dir=tmp_path / "other", resolution=16, n_train=[61])
    assert not (tmp_path / "other" / "cifar100" / "res16" / "train.beton").exists()
    assert leftovers(tmp_path) == []


def test_cifar_source_missing_files_names_them(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(MlpscaleError, match=r"lacks .*data_batch_2.*python-version"):
        prepare_dataset("cifar10", source=tmp_path, data_dir=tmp_path / "data")
    with pytest.raises(MlpscaleError, match="does not exist"):
        prepare_dataset("cifar100", source=tmp_path / "nope", data_dir=tmp_path / "data")
    with pytest.raises(MlpscaleError, match="needs --source"):
        prepare_dataset("cifar10", data_dir=tmp_path / "data")


# --- class-folder tree -----------------------------------------------------------------------


@pytest.fixture
def folder_tree(tmp_path) -> Path:
    """train/ and val/ with PNG and JPEG of mixed sizes, grayscale, RGBA, and one corrupt file."""
    rng = np.random.default_rng(3)
    root = tmp_path / "tree"
    for split, per_class in (("train", 4), ("val", 2)):
        for class_name in ("bird", "cat", "dog"):
            folder = root / split / class_name
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = (int(rng.integers(10, 40)), int(rng.integers(10, 40)))
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    Image.fromarray(np.full((20, 30), 77, dtype=np.uint8), mode="L").save(root / "train" / "cat" / "gray.png")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    rgba[8:, :, 3] = 0  # bottom half transparent: composited on white
    Image.fromarray(rgba, mode="RGBA").save(root / "train" / "dog" / "rgba.png")
    (root / "train" / "bird" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return root


def test_folder_tree_skips_corrupt_file(folder_tree, tmp_path):
    directory = prepare_dataset("folder", source=folder_tree, data_dir=tmp_path / "data", resolution=16, name="pets")
    assert directory == tmp_path / "data" / "pets" / "res16"
    meta = load_meta(directory)
    assert meta["classes"] == ["bird", "cat", "dog"]
    assert meta["counts"] == {"train": 14, "test": 6}
    assert [Path(s["file"]).name for s in meta["skipped"]] == ["broken.jpg"]
    assert meta["skipped"][0]["split"] == "train"
    images, labels = load_with_ffcv(directory / "train.beton")
    assert images.shape == (14, 16, 16, 3)
    assert np.bincount(labels).tolist() == [4, 5, 5]
    gray = images[np.flatnonzero(labels == 1)[-1]]  # cat/gray.png sorts after cat/0..3
    assert np.all(gray == 77)
    rgba = images[np.flatnonzero(labels == 2)[-1]]
    assert np.all(rgba[:8] == [255, 0, 0]) and np.all(rgba[8:] == [255, 255, 255])
    assert np.bincount(read_beton(directory / "test.beton")[1]).tolist() == [2, 2, 2]


def test_folder_tree_strict_stops_without_files(folder_tree, tmp_path):
    with pytest.raises(MlpscaleError, match=r"broken\.jpg.*--strict"):
        prepare_dataset("folder", source=folder_tree, data_dir=tmp_path / "data", resolution=16, strict=True)
    assert not list((tmp_path / "data").rglob("*.beton")) and leftovers(tmp_path) == []


def test_folder_tree_without_test_split_is_rejected(tmp_path):
    (tmp_path / "tree" / "train" / "a").mkdir(parents=True)
    with pytest.raises(MlpscaleError, match=r"train/ and test/ \(or val/\)"):
        prepare_dataset("folder", source=tmp_path / "tree", data_dir=tmp_path / "data")


# --- downsampled ImageNet --------------------------------------------------------------------


def test_imagenet64_npz_batches(tmp_path):
    rng = np.random.default_rng(4)
    source = tmp_path / "Imagenet8"
    source.mkdir()
    batches = []
    for number in (1, 2):
        images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
        labels = rng.integers(1, 6, 10)
        labels[0] = 5  # the highest class appears, so num_classes is 5
        batches.append((images, labels))
        np.savez(source / f"train_data_batch_{number}.npz", data=planar(images), labels=labels, mean=np.zeros(192))
    val_images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(source / "val_data.npz", data=planar(val_images), labels=np.arange(1, 6))

    directory = prepare_dataset("imagenet64", source=source, data_dir=tmp_path / "data", resolution=8)
    meta = load_meta(directory)
    assert meta["num_classes"] == 5 and meta["counts"] == {"train": 20, "test": 5}
    images, labels = load_with_ffcv(directory / "train.beton")
    np.testing.assert_array_equal(images, np.concatenate([b[0] for b in batches]))
    np.testing.assert_array_equal(labels, np.concatenate([b[1] for b in batches]) - 1)
    images, labels = read_beton(directory / "test.beton")
    np.testing.assert_array_equal(images, val_images)
    np.testing.assert_array_equal(labels, np.arange(5))


# --- interrupted writes ----------------------------------------------------------------------


class _FailingDataset:
    """Yields a few good samples, then raises inside the FFCV writer process."""

    def __init__(self, fail_at: int, size: int):
        self.fail_at, self.size = fail_at, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if index == self.fail_at:
            raise RuntimeError("disk pulled out mid-write")
        return np.zeros((8, 8, 3), dtype=np.uint8), 0


def test_interrupted_beton_write_leaves_no_file(tmp_path):
    with pytest.raises(BetonWriteError):
        write_beton(
            tmp_path / "train.beton",
            np.zeros((1, 8, 8, 3), dtype=np.uint8),
            None,
            dataset=_FailingDataset(fail_at=300, size=600),
        )
    assert list(tmp_path.iterdir()) == []
    # a failed rewrite leaves the previous complete file untouched
    good = np.full((3, 8, 8, 3), 9, dtype=np.uint8)
    write_beton(tmp_path / "train.beton", good, [0, 1, 2])
    with pytest.raises(BetonWriteError):
        write_beton(tmp_path / "train.beton", good, None, dataset=_FailingDataset(fail_at=10, size=600))
    images, labels = read_beton(tmp_path / "train.beton")
    np.testing.assert_array_equal(images, good)
    assert labels.tolist() == [0, 1, 2] and [p.name for p in tmp_path.iterdir()] == ["train.beton"]


def test_interrupted_source_leaves_no_file(tmp_path, monkeypatch):
    def failing_items():
        for i in range(50):
            yield np.zeros((8, 8), dtype=np.uint8), i % 2
        raise OSError("source vanished")

    def failing_reader(source=None):
        split = SplitSource("train", 100, failing_items)
        return Source("digits", "test", ["a", "b"], {"train": split, "test": split})

    monkeypatch.setitem(sources.READERS, "digits", failing_reader)
    with pytest.raises(OSError, match="source vanished"):
        prepare_dataset("digits", data_dir=tmp_path)
    directory = tmp_path / "digits" / "res16"
    assert not (directory / "train.beton").exists() and list(directory.iterdir()) == []


def test_jpeg_mode_reads_back_close(tmp_path):
    rng = np.random.default_rng(5)
    images = cv2.GaussianBlur(rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8).reshape(-1, 32, 3), (7, 7), 3)
    images = images.reshape(12, 32, 32, 3)
    write_beton(tmp_path / "x.beton", images, np.arange(12), jpeg=True)
    decoded, labels = read_beton(tmp_path / "x.beton")
    np.testing.assert_array_equal(labels, np.arange(12))
    assert np.abs(decoded.astype(int) - images).mean() < 8


# --- command line ----------------------------------------------------------------------------


def test_cli_missing_source_is_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "prepare_data.py"),
            "cifar10",
            "--source",
            str(tmp_path / "missing.tar.gz"),
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: source {tmp_path / 'missing.tar.gz'} does not exist; "
        "expected the official python-version .tar.gz or its extracted folder"
    ]


def test_cli_in_process(digits_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data_job", REPO / "jobs" / "prepare_data.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["digits", "--source", str(tmp_path), "--data-dir", str(tmp_path)]) == 2
    assert "takes no --source" in capsys.readouterr().err
    assert job.main(["digits", "--data-dir", str(digits_dir), "--resolution", "16", "--n-train", "99999"]) == 2
    assert "larger than the train split" in capsys.readouterr().err
    assert job.main(["digits", "--data-dir", str(digits_dir), "--resolution", "16"]) == 0
    out = capsys.readouterr().out
    assert str(digits_dir / "digits" / "res16") in out and "train_n600.beton: 600 images" in out
    assert json.loads((digits_dir / "digits" / "res16" / "meta.json").read_text())["subsets"] == [300, 600]
    assert not os.listdir(tmp_path)
