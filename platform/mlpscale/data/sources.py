"""One reader per source format, each giving class names and train/test splits of (image or file, label).

An item is either uint8 pixels (H, W[, C]) or the path of an image file to decode later.
Formats: digits (scikit-learn's bundled set, no source needed), cifar10/cifar100 (the
official "python version" archive or its extracted folder), folder (`<source>/<split>/<class>/<image>`),
imagenet64 (downsampled-ImageNet npz batches, Chrabaszcz et al. 2017).
"""

from __future__ import annotations

import os
import pickle
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlpscale.errors import MlpscaleError

Item = tuple[np.ndarray | Path, int]

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}


@dataclass
class SplitSource:
    name: str
    size: int  # items the split will yield (before skipping undecodable files)
    items: Callable[[], Iterator[Item]]


@dataclass
class Source:
    dataset: str
    origin: str  # where it came from, for meta.json
    classes: list[str]
    splits: dict[str, SplitSource]  # "train" and "test"


def _array_split(name: str, images: np.ndarray, labels: np.ndarray) -> SplitSource:
    labels = np.asarray(labels, dtype=np.int64)
    return SplitSource(name, len(labels), lambda: zip(images, (int(label) for label in labels)))


# --- digits -----------------------------------------------------------------------------------


def read_digits(source: str | os.PathLike | None = None) -> Source:
    """scikit-learn's 8x8 digits (0..16 gray levels scaled to 0..255), split 80/20 stratified with seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if source is not None:
        raise MlpscaleError(f"digits is bundled with scikit-learn and takes no --source (got {source}); drop --source")
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return Source(
        dataset="digits",
        origin="sklearn.datasets.load_digits",
        classes=[str(d) for d in range(10)],
        splits={
            "train": _array_split("train", images[train_idx], labels[train_idx]),
            "test": _array_split("test", images[test_idx], labels[test_idx]),
        },
    )


# --- cifar ------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": dict(
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": dict(
        train=["train"], test=["test"], meta="meta", label_key=b"fine_labels", names_key=b"fine_label_names"
    ),
}


def _cifar_files(dataset: str, source: Path) -> dict[str, bytes]:
    """The raw bytes of the needed pickles, from a .tar.gz or an extracted folder (at its top or one level down)."""
    spec = _CIFAR[dataset]
    wanted = set(spec["train"] + spec["test"] + [spec["meta"]])
    found: dict[str, bytes] = {}
    if source.is_file():
        try:
            with tarfile.open(source, "r:*") as archive:
                for member in archive.getmembers():
                    name = Path(member.name).name
                    if member.isfile() and name in wanted and name not in found:
                        found[name] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError) as error:
            raise MlpscaleError(
                f"cannot read {source} as a tar archive ({error}); expected the official CIFAR "
                f"python-version archive (e.g. {dataset.replace('cifar', 'cifar-')}-python.tar.gz) "
                "or its extracted folder"
            ) from None
    else:
        for folder in [source, *sorted(p for p in source.iterdir() if p.is_dir())]:
            for name in wanted - set(found):
                if (folder / name).is_file():
                    found[name] = (folder / name).read_bytes()
    missing = sorted(wanted - set(found))
    if missing:
        raise MlpscaleError(
            f"{source} lacks {', '.join(missing)}; expected the official {dataset} python-version archive "
            f"or its extracted folder ({', '.join(spec['train'] + spec['test'])}, {spec['meta']})"
        )
    return found


def _unpickle(name: str, blob: bytes, source: Path) -> dict:
    try:
        return pickle.loads(blob, encoding="bytes")
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad source file
        raise MlpscaleError(f"{name} in {source} is not a CIFAR python pickle ({error})") from None


def _read_cifar(dataset: str, source: str | os.PathLike | None) -> Source:
    source = _existing(dataset, source, "the official python-version .tar.gz or its extracted folder")
    spec = _CIFAR[dataset]
    files = _cifar_files(dataset, source)
    names = [
        n.decode() if isinstance(n, bytes) else str(n)
        for n in _unpickle(spec["meta"], files[spec["meta"]], source)[spec["names_key"]]
    ]

    def load(batch_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in batch_names:
            batch = _unpickle(name, files[name], source)
            if b"data" not in batch or spec["label_key"] not in batch:
                raise MlpscaleError(f"{name} in {source} lacks b'data' or {spec['label_key']!r}; is it {dataset}?")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[spec["label_key"]], dtype=np.int64))
        return np.concatenate(images), np.concatenate(labels)

    train_images, train_labels = load(spec["train"])
    test_images, test_labels = load(spec["test"])
    return Source(
        dataset=dataset,
        origin=str(source),
        classes=names,
        splits={
            "train": _array_split("train", train_images, train_labels),
            "test": _array_split("test", test_images, test_labels),
        },
    )


def read_cifar10(source=None) -> Source:
    return _read_cifar("cifar10", source)


def read_cifar100(source=None) -> Source:
    return _read_cifar("cifar100", source)


# --- folder -----------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and (p.suffix.lower() in IMAGE_SUFFIXES or not p.suffix)
    )


def read_folder(source: str | os.PathLike | None = None) -> Source:
    """`<source>/train/<class>/<image>` plus `<source>/test/...` (or `val/`); classes from train's sub-folders."""
    source = _existing("folder", source, "a class-folder tree <source>/train/<class>/<image> plus test/ or val/")
    expected = "<source>/train/<class>/<image> plus <source>/test/<class>/<image> (or val/)"
    train_dir = source / "train"
    test_dir = next((source / name for name in ("test", "val") if (source / name).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise MlpscaleError(f"{source} needs sub-folders train/ and test/ (or val/); expected {expected}")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise MlpscaleError(f"{train_dir} has no class sub-folders; expected {expected}")
    index = {name: i for i, name in enumerate(classes)}

    def split(name: str, folder: Path) -> SplitSource:
        entries: list[tuple[Path, int]] = []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if class_dir.name not in index:
                raise MlpscaleError(
                    f"class folder {class_dir} has no counterpart in {train_dir}; "
                    f"rename it to one of the train classes or add it to train/"
                )
            entries += [(path, index[class_dir.name]) for path in _image_files(class_dir)]
        if not entries:
            raise MlpscaleError(f"{folder} holds no image files; expected {expected}")
        return SplitSource(name, len(entries), lambda: iter(entries))

    return Source(
        dataset="folder",
        origin=str(source),
        classes=classes,
        splits={"train": split("train", train_dir), "test": split("test", test_dir)},
    )


# --- imagenet64 -------------------------------------------------------------------------------


def _batch_number(path: Path) -> int:
    match = re.search(r"(\d+)$", path.name.removesuffix(".npz"))
    return int(match.group(1)) if match else 0


def _load_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - any reading failure is a bad source file
        raise MlpscaleError(
            f"cannot read {path} as an npz batch ({error}); expected downsampled-ImageNet "
            f"npz files with 'data' and 'labels'"
        ) from None


def read_imagenet64(source: str | os.PathLike | None = None) -> Source:
    """Downsampled ImageNet: train_data_batch_1..10[.npz] and val_data[.npz]; rows channel-planar, labels 1-based."""
    expected = "train_data_batch_1..10(.npz) and val_data(.npz) (downsampled ImageNet, Chrabaszcz et al. 2017)"
    source = _existing("imagenet64", source, expected)
    candidates = [p for p in source.rglob("*") if p.is_file()]
    train_files = sorted(
        (p for p in candidates if re.fullmatch(r"train_data_batch_\d+(\.npz)?", p.name)), key=_batch_number
    )
    val_files = [p for p in candidates if re.fullmatch(r"val_data(\.npz)?", p.name)]
    if not train_files or not val_files:
        raise MlpscaleError(
            f"{source} lacks {'train_data_batch_*' if not train_files else 'val_data'}; expected {expected}"
        )

    def labels_of(path: Path) -> np.ndarray:
        with _load_npz(path) as batch:
            if "labels" not in batch or "data" not in batch:
                raise MlpscaleError(f"{path} lacks 'data' or 'labels'; expected {expected}")
            return np.asarray(batch["labels"], dtype=np.int64).reshape(-1) - 1

    def split(name: str, files: list[Path]) -> tuple[SplitSource, int]:
        sizes, top = [], -1
        for path in files:
            labels = labels_of(path)
            if labels.size and labels.min() < 0:
                raise MlpscaleError(f"{path} has label 0; downsampled-ImageNet labels are 1-based")
            sizes.append(labels.size)
            top = max(top, int(labels.max()) if labels.size else -1)

        def items() -> Iterator[Item]:
            for path in files:
                with _load_npz(path) as batch:
                    data = np.asarray(batch["data"], dtype=np.uint8)
                    labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1) - 1
                side = int(round((data.shape[1] / 3) ** 0.5))
                if 3 * side * side != data.shape[1]:
                    raise MlpscaleError(f"{path}: rows of {data.shape[1]} values are not 3*R*R channel-planar images")
                images = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
                yield from zip(images, (int(label) for label in labels))

        return SplitSource(name, int(sum(sizes)), items), top

    train, train_top = split("train", train_files)
    test, test_top = split("test", val_files)
    num_classes = max(train_top, test_top) + 1
    return Source(
        dataset="imagenet64",
        origin=str(source),
        classes=_imagenet_names(source, num_classes),
        splits={"train": train, "test": test},
    )


def _imagenet_names(source: Path, num_classes: int) -> list[str]:
    """Class names from map_clsloc.txt (`wnid index name`, index 1-based) when present, else the 1-based ids."""
    names = [str(i + 1) for i in range(num_classes)]
    mapping = next(iter(source.rglob("map_clsloc.txt")), None)
    if mapping is not None:
        for line in mapping.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit() and 0 < int(parts[1]) <= num_classes:
                names[int(parts[1]) - 1] = parts[2] if len(parts) > 2 else parts[0]
    return names


# --- dispatch ---------------------------------------------------------------------------------


def _existing(dataset: str, source: str | os.PathLike | None, expected: str) -> Path:
    if source is None:
        raise MlpscaleError(f"{dataset} needs --source PATH: {expected}")
    path = Path(source).expanduser()
    if not path.exists():
        raise MlpscaleError(f"source {path} does not exist; expected {expected}")
    if not os.access(path, os.R_OK):
        raise MlpscaleError(f"source {path} is not readable; expected {expected}")
    return path.resolve()


READERS: dict[str, Callable[..., Source]] = {
    "digits": read_digits,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "folder": read_folder,
    "imagenet64": read_imagenet64,
}


def read_source(dataset: str, source: str | os.PathLike | None = None) -> Source:
    """The reader for `dataset` applied to `source`; an unknown dataset names the known ones."""
    if dataset not in READERS:
        raise MlpscaleError(f"unknown dataset {dataset!r}; choose one of {', '.join(READERS)}")
    return READERS[dataset](source)
