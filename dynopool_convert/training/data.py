"""Datasets for fine-tuning: parse ``--data SPEC`` and build train/val datasets.

Specs: ``imagefolder:DIR`` (DIR/train, DIR/val; also training, valid, validation, test; without a
validation split, 10% of each class's training images; without either, DIR/<class>/ is the training data),
``csv:FILE`` (a list of image paths and labels, optionally splits: ``data_csv.py``), ``npz:FILE``
(NumPy arrays ``x_train``/``y_train``, ``x_test``/``y_test``: ``data_arrays.py``),
``cifar10:DIR``, ``cifar100:DIR`` (the python pickle layout), ``fashion-mnist:DIR``, ``mnist:DIR``,
``kmnist:DIR`` (IDX files, gzipped or not), ``synthetic`` (random learnable tensors) and ``bundled`` (the Fashion-MNIST
subset shipped in the package; the default). Images are resized to the model's reference size and converted to its channel count
with timm's transforms. Augmentation randomness is seeded per (seed, epoch, sample), so a run
is reproducible whatever the number of loader workers and wherever it resumes.
"""
from __future__ import annotations

import gzip
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserInputError
from .data_arrays import npz_arrays
from .data_csv import csv_splits
from .image_files import imagefolder_splits

__all__ = [
    "DataSpec",
    "AugmentConfig",
    "parse_data_spec",
    "build_datasets",
    "read_idx",
    "BUNDLED_PATH",
    "SeededDataset",
    "SkipUnreadable",
    "unreadable_files",
    "unreadable_warnings",
    "carve_holdout",
    "holdout_cap",
]

BUNDLED_PATH = Path(__file__).resolve().parent.parent / "data" / "fashion_mnist_subset.npz"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: the IDX (MNIST-format) datasets: kind -> (name, torchvision's folder, class names)
IDX_DATASETS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "fashion-mnist": ("Fashion-MNIST", "FashionMNIST", FASHION_CLASSES),
    "mnist": ("MNIST", "MNIST", tuple(str(d) for d in range(10))),
    "kmnist": ("KMNIST", "KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}
DATA_KINDS = ("imagefolder", "csv", "npz", "cifar10", "cifar100", *IDX_DATASETS, "synthetic", "bundled")
DATA_SPECS = "imagefolder:DIR, csv:FILE, npz:FILE, cifar10:DIR, cifar100:DIR, fashion-mnist:DIR, mnist:DIR, kmnist:DIR, synthetic or bundled"


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: the kind and its directory (or options for ``synthetic``)."""

    kind: str
    path: Path | None = None
    options: dict[str, int] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    """Training augmentation, passed to ``timm.data.create_transform`` (None: per-dataset default)."""

    crop_scale: tuple[float, float] | None = None
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str | None = None
    crop_pct: float | None = None


def parse_data_spec(spec: str | None) -> DataSpec:
    """Parse ``KIND:DIR`` / ``synthetic[:classes=N,train=N,val=N]`` / ``bundled`` (None = bundled).

    >>> parse_data_spec("cifar10:/data/c10").kind
    'cifar10'
    """
    if spec is None or spec == "" or spec == "bundled":
        return DataSpec("bundled")
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "synthetic":
        options: dict[str, int] = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key not in ("classes", "train", "val") or not value.isdigit() or int(value) < 1:
                raise UserInputError(f"bad synthetic data option {item!r}: use synthetic:classes=N,train=N,val=N with positive integers")
            options[key] = int(value)
        return DataSpec("synthetic", None, options)
    if kind not in DATA_KINDS or kind == "bundled":
        raise UserInputError(
            f"unknown data spec {spec!r}: use {DATA_SPECS}"
        )
    a_file = kind in ("csv", "npz")
    if not rest:
        raise UserInputError(f"data spec {spec!r} needs a {'file' if a_file else 'directory'}: "
                             f"{kind}:{'FILE' if a_file else 'DIR'}")
    path = Path(rest).expanduser()
    if a_file:
        if not path.is_file():
            raise UserInputError(f"{kind} file not found: {path}")
        return DataSpec(kind, path)
    if not path.is_dir():
        raise UserInputError(f"data directory not found: {path}")
    return DataSpec(kind, path)


# ----------------------------------------------------------------------------- raw readers

def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a numpy array."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserInputError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise UserInputError(f"{path}: IDX header says {dims} but the file holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(root: Path, stem: str, kind: str = "fashion-mnist") -> Path:
    name, folder, _ = IDX_DATASETS[kind]
    dotted = stem.replace("-idx", ".idx")  # the naming of some mirrors: train-images.idx3-ubyte
    for base in (stem, dotted):
        for file in (base, base + ".gz"):
            for candidate in (root / file, root / "raw" / file, root / folder / "raw" / file):
                if candidate.is_file():
                    return candidate
    raise UserInputError(f"{name} file {stem}[.gz] not found in {root} (expected the four IDX files)")


def load_idx_dataset(root: Path, kind: str = "fashion-mnist") -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (test images, labels)) from the IDX files of ``kind`` under ``root``."""
    name, _, classes = IDX_DATASETS[kind]
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte", kind))
        labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte", kind))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserInputError(f"{name} {prefix} files in {root} do not match (images {images.shape}, labels {labels.shape})")
        if len(labels) and int(labels.max()) >= len(classes):
            raise UserInputError(f"{name} {prefix} labels in {root} go up to {int(labels.max())}; {name} has {len(classes)} classes")
        splits.append((images, labels))
    return splits[0], splits[1]


def load_fashion_mnist(root: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (test images, labels)) from the Fashion-MNIST IDX files under ``root``."""
    return load_idx_dataset(root, "fashion-mnist")


def load_bundled() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The Fashion-MNIST subset shipped with the package (see data/FASHION_MNIST_LICENSE.txt)."""
    if not BUNDLED_PATH.is_file():
        raise UserInputError(f"the bundled dataset is missing from the installation: {BUNDLED_PATH}")
    with np.load(BUNDLED_PATH) as z:
        return (z["train_images"], z["train_labels"]), (z["val_images"], z["val_labels"])


# ----------------------------------------------------------------------------- datasets

class ArrayImageDataset(Dataset):
    """uint8 images (N x H x W or N x H x W x C) + labels, yielding PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[idx]), int(self.labels[idx])


class SyntheticDataset(Dataset):
    """Random tensors around a smooth class-dependent pattern (learnable, for smoke tests)."""

    def __init__(self, n: int, classes: int, input_size: tuple[int, int, int], seed: int) -> None:
        # smooth class patterns (4x4 noise upsampled), shared by the splits; noise drawn per split
        coarse = torch.randn(classes, input_size[0], 4, 4, generator=torch.Generator().manual_seed(0))
        templates = torch.nn.functional.interpolate(coarse, size=tuple(input_size[1:]), mode="bilinear")
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % classes
        self.images = templates[self.labels] + 0.5 * torch.randn(n, *input_size, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.images[idx], int(self.labels[idx])


class SeededDataset(Dataset):
    """Applies ``transform`` under RNG seeded from (seed, epoch, index), then restores the RNGs.

    Makes augmentation independent of loader workers and of where a run resumed; the global
    RNG stream (dropout, drop-path) is left untouched.
    """

    def __init__(self, base: Dataset, transform: Callable | None, seed: int, channels: int | None) -> None:
        self.base, self.transform, self.seed, self.channels = base, transform, seed, channels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int):
        image, label = self.base[idx]
        if isinstance(image, Image.Image) and self.channels is not None:
            image = image.convert("L" if self.channels == 1 else "RGB")
        if self.transform is None:
            return image, label
        sample_seed = (self.seed * 1_000_003 + self.epoch * 7_919 + idx) % (2**63)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % (2**32))
            try:
                image = self.transform(image)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return image, label


class SkipUnreadable(Dataset):
    """An image-file dataset that replaces an unreadable image by the next readable one.

    Corrupt or truncated files do not stop a long run: each is skipped (the same way every
    epoch and whatever the number of workers) and counted in a shared-memory table, so the
    trainer can warn with the number of skipped files and an example path.
    """

    def __init__(self, base: Dataset, split: str) -> None:
        self.base, self.split = base, split
        self.bad = torch.zeros(len(base), dtype=torch.uint8).share_memory_()  # seen by loader workers

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int):
        n = len(self.base)
        for k in range(n):
            j = (idx + k) % n
            if self.bad[j]:
                continue
            try:
                return self.base[j]
            except (OSError, ValueError, SyntaxError):  # PIL: UnidentifiedImageError, truncated file
                self.bad[j] = 1
        raise UserInputError(f"no readable image in the {self.split} split ({n} files, all unreadable)")

    def unreadable(self) -> list[str]:
        """Paths of the files found unreadable so far."""
        samples = getattr(self.base, "samples", None)
        return [samples[i][0] if samples else str(i) for i in torch.nonzero(self.bad).flatten().tolist()]


@dataclass
class Datasets:
    """Train and validation datasets ready for a DataLoader, plus what the model needs to know."""

    train: SeededDataset
    val: SeededDataset
    num_classes: int
    class_names: list[str]
    notes: list[str] = field(default_factory=list)  # said once when the run starts


def _transforms(input_size: tuple[int, int, int], small: bool, aug: AugmentConfig):
    from timm.data import create_transform
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    channels, h, w = input_size
    mean = IMAGENET_DEFAULT_MEAN if channels == 3 else (0.5,) * channels
    std = IMAGENET_DEFAULT_STD if channels == 3 else (0.5,) * channels
    crop_pct = aug.crop_pct if aug.crop_pct is not None else (1.0 if small else None)
    scale = aug.crop_scale if aug.crop_scale is not None else ((0.6, 1.0) if small else (0.08, 1.0))
    common = dict(input_size=(channels, h, w), mean=mean, std=std, interpolation="bilinear")
    train = create_transform(
        is_training=True, scale=tuple(scale), hflip=aug.hflip, color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment, **common,
    )
    val = create_transform(is_training=False, crop_pct=crop_pct, **common)
    return train, val


def _cifar(kind: str, root: Path):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if kind == "cifar10" else CIFAR100
    if root.name == cls.base_folder:  # accept the extracted folder itself as well as its parent
        root = root.parent
    try:
        return cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise UserInputError(f"{kind} data not found in {root}: expected {root / cls.base_folder} (the python pickle batches)") from err




def build_datasets(
    spec: DataSpec, input_size: tuple[int, int, int], seed: int = 0, augment: AugmentConfig | None = None
) -> Datasets:
    """Train/val datasets for ``spec`` producing tensors of ``input_size`` (C, H, W)."""
    aug = augment or AugmentConfig()
    channels = int(input_size[0])
    notes: list[str] = []
    if spec.kind == "synthetic":
        classes = spec.options.get("classes", 4)
        train = SyntheticDataset(spec.options.get("train", 64), classes, tuple(input_size), seed=1234)
        val = SyntheticDataset(spec.options.get("val", 32), classes, tuple(input_size), seed=4321)
        from torchvision.transforms import RandomHorizontalFlip

        flip = RandomHorizontalFlip(aug.hflip)
        return Datasets(SeededDataset(train, flip, seed, None), SeededDataset(val, None, seed, None), classes,
                        [f"class{i}" for i in range(classes)])
    if spec.kind == "bundled" or spec.kind in IDX_DATASETS:
        (xt, yt), (xv, yv) = load_bundled() if spec.kind == "bundled" else load_idx_dataset(spec.path, spec.kind)
        train_base, val_base = ArrayImageDataset(xt, yt), ArrayImageDataset(xv, yv)
        classes, small = list(IDX_DATASETS.get(spec.kind, IDX_DATASETS["fashion-mnist"])[2]), True
    elif spec.kind == "npz":
        (xt, yt), (xv, yv), classes, note = npz_arrays(spec.path)
        notes += [note] if note else []
        train_base, val_base, small = ArrayImageDataset(xt, yt), ArrayImageDataset(xv, yv), max(xt.shape[1:3]) <= 64
    elif spec.kind in ("cifar10", "cifar100"):
        train_base, val_base = _cifar(spec.kind, spec.path)
        classes, small = list(train_base.classes), True
    elif spec.kind in ("imagefolder", "csv"):
        train_folder, val_folder, note = (imagefolder_splits if spec.kind == "imagefolder" else csv_splits)(spec.path)
        notes += [note] if note else []
        train_base, val_base = SkipUnreadable(train_folder, "train"), SkipUnreadable(val_folder, "val")
        classes, small = list(train_folder.classes), False
    else:  # parse_data_spec guards this
        raise UserInputError(f"unknown data kind {spec.kind!r}")
    if len(train_base) == 0 or len(val_base) == 0:
        raise UserInputError(f"the {spec.kind} data has an empty split (train {len(train_base)}, val {len(val_base)})")
    t_train, t_val = _transforms(tuple(input_size), small, aug)
    return Datasets(
        SeededDataset(train_base, t_train, seed, channels),
        SeededDataset(val_base, t_val, seed, channels),
        len(classes),
        classes,
        notes,
    )


HOLDOUT_MIN = 256  # the held-out split of a run of a few steps: enough to tell a collapsed allocation apart


def holdout_cap(holdout_max: int, steps: int | None, images_per_step: int) -> int:
    """The most images to hold out: ``holdout_max``, and in a run given as ``steps`` no more than
    it trains on (at least ``HOLDOUT_MIN``): the search scores every allocation on all of them,
    and 5000 images scored some 50 times made a 3-step smoke run wait minutes."""
    if steps is None:
        return holdout_max
    return min(holdout_max, max(HOLDOUT_MIN, steps * images_per_step))


def carve_holdout(data: Datasets, fraction: float, cap: int, seed: int) -> SeededDataset | None:
    """Move a random ``fraction`` of the training images (at most ``cap``) out of ``data.train``
    into a held-out split with the validation transform; None when too few images to split.

    The split depends only on ``seed`` and the data, so a resumed run holds out the same images.
    """
    n = len(data.train)
    k = min(int(round(fraction * n)), cap)
    if k < 1 or n - k < 1:
        return None
    from torch.utils.data import Subset

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104_729)).tolist()
    held, kept = sorted(order[:k]), sorted(order[k:])
    train, val = data.train, data.val
    data.train = SeededDataset(Subset(train.base, kept), train.transform, train.seed, train.channels)
    data.train.full = train  # keeps SkipUnreadable reachable for warnings
    return SeededDataset(Subset(train.base, held), val.transform, val.seed, val.channels)


def unreadable_files(data: "Datasets") -> dict[str, list[str]]:
    """Per split, the image files skipped as unreadable so far (empty for in-memory datasets)."""
    out = {}
    for split, ds in (("train", getattr(data.train, "full", data.train)), ("val", data.val)):
        base = getattr(ds, "base", None)
        if isinstance(base, SkipUnreadable):
            out[split] = base.unreadable()
    return out


def unreadable_warnings(data: "Datasets") -> list[str]:
    """One warning line per split in which unreadable image files have been skipped so far."""
    return [f"warning: skipped {len(paths)} unreadable image file(s) in {split} so far, "
            f"each replaced by the next readable one (first: {paths[0]})"
            for split, paths in unreadable_files(data).items() if paths]
