"""Data sets for the experiments: fixed train/validation/test splits as in-memory tensors.

- ``digits`` (default): scikit-learn's handwritten digits, 1,797 real 8x8 grey images, 10 classes.
  It ships inside scikit-learn, so it is always available.
- ``mnist`` / ``fashion-mnist``: read from a local ``--data-root`` in torchvision's raw layout
  (``<root>/MNIST/raw/train-images-idx3-ubyte`` and friends, optionally ``.gz``). The idx files are
  parsed directly, so torchvision is not needed.
- ``cifar10``: through ``torchvision.datasets.CIFAR10(download=False)`` when a real copy is present
  (torchvision verifies the checksums; imported lazily).
- ``mnist1d``: MNIST-1D (Greydanus 2020), 5,000 one-dimensional signals of length 40, generated
  locally from the ten digit templates by the ``mnist1d`` package's ``make_dataset`` with its
  published default arguments (``pip install mnist1d``; nothing is downloaded): 4,000 for training
  (a stratified 20% of them held out for validation) and the package's 1,000 test signals.

Nothing is ever downloaded. Images become float tensors ``[N, C, H, W]`` (signals ``[N, C, L]``) normalised with the
training split's per-channel mean and standard deviation; labels are int64. Scores are meant to be
computed on ``val`` and results reported on ``test``.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "mnist1d")

# torchvision's folder names for the idx-format data sets.
_IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class DataSplits:
    """A data set split three ways, plus what a model needs to know about it."""

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    input_size: tuple  # (C, H, W) or (C, L), no batch dim
    num_classes: int

    def loaders(self, batch_size: int = 64, eval_batch_size: int = 512, seed: int = 0):
        """(train, val, test) DataLoaders; only the training loader shuffles (seeded)."""
        return (
            make_loader(self.train, batch_size, shuffle=True, seed=seed),
            make_loader(self.val, eval_batch_size),
            make_loader(self.test, eval_batch_size),
        )

    def describe(self) -> str:
        return (
            f"{self.name}: train {len(self.train)}, val {len(self.val)}, test {len(self.test)}, "
            f"input {tuple(self.input_size)}, {self.num_classes} classes"
        )


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A single-process DataLoader; shuffling uses its own generator so the global RNG is untouched."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def load_dataset(
    name: str = "digits", data_root: str | Path | None = None, split_seed: int = 0, val_size: float | int | None = None
) -> DataSplits:
    """Load one of :data:`DATASETS` with a fixed, seeded split.

    Args:
        name: ``digits``, ``mnist``, ``fashion-mnist``, ``cifar10`` or ``mnist1d``.
        data_root: folder holding the raw files (not needed for ``digits``).
        split_seed: seed of the train/validation(/test) split; keep it fixed across runs so the
            test set never changes.
        val_size: fraction or count of the training data held out for validation (scoring).
            Defaults: 20% of digits (and another 20% for test), 5,000 images otherwise.
    """
    key = name.lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key == "digits":
        return load_digits_splits(split_seed, val_size=0.2 if val_size is None else val_size)
    if key == "mnist1d":
        return load_mnist1d(split_seed, val_size=0.2 if val_size is None else val_size)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if data_root is None:
        raise ValueError(f"data set {name!r} needs --data-root pointing at a local copy (nothing is downloaded)")
    if key in _IDX_FOLDERS:
        return load_idx_dataset(key, data_root, split_seed, val_size=5000 if val_size is None else val_size)
    return load_cifar10(data_root, split_seed, val_size=5000 if val_size is None else val_size)


# --------------------------------------------------------------------------------------------
# digits


def load_digits_splits(split_seed: int = 0, val_size: float | int = 0.2, test_size: float | int = 0.2) -> DataSplits:
    """scikit-learn's digits, stratified train/val/test (60/20/20 by default)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None, :, :] / 16.0  # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(split_seed)
    n = len(labels)
    n_test = _as_count(test_size, n)
    n_val = _as_count(val_size, n)
    test_idx, rest = _stratified_take(labels, np.arange(n), n_test, rng)
    val_idx, train_idx = _stratified_take(labels, rest, n_val, rng)
    return _make_splits("digits", images, labels, train_idx, val_idx, images, labels, test_idx, 10)


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (idx files in torchvision's raw layout)


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one idx file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx element type 0x{type_code:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = raw[4 + 4 * ndim :]
    if len(payload) != expected:
        raise ValueError(f"{path}: expected {expected} bytes of data for shape {shape}, got {len(payload)}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def find_idx_folder(name: str, data_root: str | Path) -> Path:
    """The folder holding the idx files: ``<root>/<Folder>/raw``, ``<root>/<Folder>`` or ``<root>``."""
    root = Path(data_root).expanduser()
    folder = _IDX_FOLDERS[name]
    candidates = [root / folder / "raw", root / folder, root / "raw", root]
    for candidate in candidates:
        if _idx_file(candidate, _IDX_FILES["train"][0]) is not None:
            return candidate
    raise FileNotFoundError(
        f"no {folder} idx files under {root} (looked in {', '.join(str(c) for c in candidates)}); "
        f"expected torchvision's raw layout, e.g. {root / folder / 'raw' / _IDX_FILES['train'][0]}"
    )


def load_idx_dataset(name: str, data_root: str | Path, split_seed: int = 0, val_size: float | int = 5000) -> DataSplits:
    """MNIST or Fashion-MNIST from local idx files; validation is held out of the training set."""
    folder = find_idx_folder(name, data_root)
    arrays = {}
    for split, (images_file, labels_file) in _IDX_FILES.items():
        images_path, labels_path = _idx_file(folder, images_file), _idx_file(folder, labels_file)
        if images_path is None or labels_path is None:
            raise FileNotFoundError(f"{folder}: missing {images_file} or {labels_file}")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
        arrays[split] = (images.astype(np.float32)[:, None] / 255.0, labels.astype(np.int64))
    train_images, train_labels = arrays["train"]
    test_images, test_labels = arrays["test"]
    rng = np.random.default_rng(split_seed)
    n_val = _as_count(val_size, len(train_labels))
    val_idx, train_idx = _stratified_take(train_labels, np.arange(len(train_labels)), n_val, rng)
    return _make_splits(
        name, train_images, train_labels, train_idx, val_idx, test_images, test_labels, np.arange(len(test_labels)), 10
    )


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# CIFAR-10 (a real copy only; torchvision checks the md5 sums)


def load_cifar10(data_root: str | Path, split_seed: int = 0, val_size: float | int = 5000) -> DataSplits:
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` via torchvision, never downloading."""
    try:
        from torchvision.datasets import CIFAR10  # lazy: torchvision is heavy and CUDA-coupled
    except Exception as error:  # pragma: no cover - depends on the install
        raise ImportError(f"CIFAR-10 needs torchvision, which failed to import: {error}") from error
    root = Path(data_root).expanduser()
    try:
        train = CIFAR10(str(root), train=True, download=False)
        test = CIFAR10(str(root), train=False, download=False)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted."
        raise FileNotFoundError(
            f"no intact CIFAR-10 copy under {root} ({error}); expected {root / 'cifar-10-batches-py'} "
            "as extracted from the official archive (files are checked against their md5 sums)"
        ) from error
    train_images = train.data.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    test_images = test.data.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    train_labels = np.asarray(train.targets, dtype=np.int64)
    test_labels = np.asarray(test.targets, dtype=np.int64)
    rng = np.random.default_rng(split_seed)
    n_val = _as_count(val_size, len(train_labels))
    val_idx, train_idx = _stratified_take(train_labels, np.arange(len(train_labels)), n_val, rng)
    return _make_splits(
        "cifar10",
        train_images,
        train_labels,
        train_idx,
        val_idx,
        test_images,
        test_labels,
        np.arange(len(test_labels)),
        10,
    )


# --------------------------------------------------------------------------------------------
# MNIST-1D (generated from its templates by the mnist1d package)


def make_mnist1d() -> dict:
    """The MNIST-1D data set of the package's default arguments, generated here (no download).

    ``make_dataset`` seeds numpy's and Python's global generators with the arguments' seed (42);
    their states are put back afterwards, so loading the data leaves a study's seeds alone.
    Returns the package's dict (``x``, ``y``, ``x_test``, ``y_test``, ...).
    """
    import random

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError(
            f"the mnist1d data set needs the mnist1d package (pip install mnist1d), which failed to import: {error}"
        ) from error
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        return make_dataset(get_dataset_args())
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def load_mnist1d(split_seed: int = 0, val_size: float | int = 0.2) -> DataSplits:
    """MNIST-1D as ``[N, 1, 40]`` signals: the package's train/test split, validation held out of train."""
    data = make_mnist1d()
    train_signals = np.asarray(data["x"], dtype=np.float32)[:, None, :]
    test_signals = np.asarray(data["x_test"], dtype=np.float32)[:, None, :]
    train_labels = np.asarray(data["y"], dtype=np.int64)
    test_labels = np.asarray(data["y_test"], dtype=np.int64)
    rng = np.random.default_rng(split_seed)
    n_val = _as_count(val_size, len(train_labels))
    val_idx, train_idx = _stratified_take(train_labels, np.arange(len(train_labels)), n_val, rng)
    return _make_splits(
        "mnist1d",
        train_signals,
        train_labels,
        train_idx,
        val_idx,
        test_signals,
        test_labels,
        np.arange(len(test_labels)),
        10,
    )


# --------------------------------------------------------------------------------------------
# helpers


def few_per_class(dataset: TensorDataset, per_class: int, seed: int = 0) -> Subset:
    """A class-balanced subset with ``per_class`` examples of each label (fewer if a class is short)."""
    labels = dataset.tensors[1].numpy()
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.extend(rng.permutation(members)[:per_class].tolist())
    return Subset(dataset, sorted(chosen))


def _as_count(size: float | int, n: int) -> int:
    count = int(round(size * n)) if isinstance(size, float) else int(size)
    if not 0 < count < n:
        raise ValueError(f"split size {size} leaves no data (of {n} examples)")
    return count


def _stratified_take(labels: np.ndarray, pool: np.ndarray, count: int, rng: np.random.Generator):
    """Take ``count`` indices from ``pool`` keeping class proportions; return (taken, rest), sorted."""
    pool = rng.permutation(pool)
    pool_labels = labels[pool]
    classes, class_counts = np.unique(pool_labels, return_counts=True)
    quota = np.floor(class_counts * count / len(pool)).astype(int)
    # hand out what rounding left over to the classes with the largest remainders
    remainder = class_counts * count / len(pool) - quota
    for position in np.argsort(-remainder)[: count - quota.sum()]:
        quota[position] += 1
    taken = np.concatenate([pool[pool_labels == c][:q] for c, q in zip(classes, quota)])
    rest = np.setdiff1d(pool, taken)
    return np.sort(taken), np.sort(rest)


def _make_splits(
    name, train_images, train_labels, train_idx, val_idx, test_images, test_labels, test_idx, num_classes
) -> DataSplits:
    fit = train_images[train_idx]
    axes = (0, *range(2, fit.ndim))  # every axis but the channels
    mean = fit.mean(axis=axes, keepdims=True)
    std = fit.std(axis=axes, keepdims=True) + 1e-8

    def tensors(images, labels, idx):
        x = torch.from_numpy(np.ascontiguousarray((images[idx] - mean) / std, dtype=np.float32))
        return TensorDataset(x, torch.from_numpy(np.ascontiguousarray(labels[idx])))

    return DataSplits(
        name=name,
        train=tensors(train_images, train_labels, train_idx),
        val=tensors(train_images, train_labels, val_idx),
        test=tensors(test_images, test_labels, test_idx),
        input_size=tuple(train_images.shape[1:]),
        num_classes=num_classes,
    )
