"""Datasets for finetune: the bundled subset, IDX/CIFAR/ImageFolder readers, specs, the sampler."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynopool_convert.errors import UserInputError
from dynopool_convert.training.data import BUNDLED_PATH, build_datasets, parse_data_spec, read_idx
from dynopool_convert.training.sampler import EpochSampler


def test_bundled_subset_is_small_balanced_real_data():
    assert BUNDLED_PATH.stat().st_size < 5e6
    assert (BUNDLED_PATH.parent / "FASHION_MNIST_LICENSE.txt").is_file()
    ds = build_datasets(parse_data_spec(None), (3, 32, 32), seed=0)
    assert ds.num_classes == 10 and len(ds.train) == 6000 and len(ds.val) == 1000
    labels = np.bincount(ds.train.base.labels, minlength=10)
    assert (labels == 600).all()
    x, y = ds.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert x.std() > 0.1  # a real image, not a constant
    v1, _ = ds.val[5]
    assert torch.equal(v1, ds.val[5][0])  # eval transform is deterministic


def test_augmentation_depends_on_seed_epoch_index_only():
    ds = build_datasets(parse_data_spec("bundled"), (1, 28, 28), seed=3).train
    a = ds[7][0]
    torch.manual_seed(123)  # the global RNG does not matter ...
    assert torch.equal(a, ds[7][0])
    ds.set_epoch(1)  # ... the epoch does
    assert not torch.equal(a, ds[7][0])
    assert ds[7][0].shape == (1, 28, 28)


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_folder(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", 12), ("t10k", 6)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 255, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz)
    ds = build_datasets(parse_data_spec(f"fashion-mnist:{tmp_path}"), (3, 16, 16))
    assert len(ds.train) == 12 and len(ds.val) == 6
    assert ds.train[0][0].shape == (3, 16, 16)
    assert read_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}").tolist() == [0, 1, 2, 3, 4, 5]


def test_mnist_kinds_read_torchvision_and_mirror_layouts(tmp_path):
    """mnist:/kmnist: read the same IDX format: torchvision's DIR/MNIST/raw, or a mirror's dotted names."""
    rng = np.random.default_rng(1)
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    flat = tmp_path / "mirror"
    flat.mkdir()
    for prefix, n in (("train", 10), ("t10k", 4)):
        images, labels = rng.integers(0, 255, (n, 28, 28)), np.arange(n) % 10
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images, True)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels, True)
        _write_idx(flat / f"{prefix}-images.idx3-ubyte", images, False)
        _write_idx(flat / f"{prefix}-labels.idx1-ubyte", labels, False)
    ds = build_datasets(parse_data_spec(f"mnist:{tmp_path / 'tv'}"), (1, 16, 16))
    assert (len(ds.train), len(ds.val), ds.class_names[:3]) == (10, 4, ["0", "1", "2"])
    ds = build_datasets(parse_data_spec(f"kmnist:{flat}"), (3, 16, 16))
    assert ds.train[0][0].shape == (3, 16, 16) and ds.class_names[0] == "o"
    with pytest.raises(UserInputError, match="KMNIST file train-images-idx3-ubyte"):
        build_datasets(parse_data_spec(f"kmnist:{tmp_path}"), (1, 16, 16))


def test_idx_labels_beyond_the_classes_are_refused(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)), False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 26]), False)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 28, 28)), False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0]), False)
    with pytest.raises(UserInputError, match="labels in .* go up to 26; MNIST has 10 classes"):
        build_datasets(parse_data_spec(f"mnist:{tmp_path}"), (1, 16, 16))


def test_imagefolder_and_its_errors(tmp_path):
    with pytest.raises(UserInputError, match="no validation split .* two images to set one aside"):
        (tmp_path / "train" / "a").mkdir(parents=True)
        Image.new("L", (10, 12), 7).save(tmp_path / "train" / "a" / "x.png")
        build_datasets(parse_data_spec(f"imagefolder:{tmp_path}"), (3, 8, 8))
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserInputError, match="no images"):
        build_datasets(parse_data_spec(f"imagefolder:{tmp_path}"), (3, 8, 8))
    Image.new("RGB", (9, 9), (1, 2, 3)).save(tmp_path / "val" / "a" / "y.png")
    ds = build_datasets(parse_data_spec(f"imagefolder:{tmp_path}"), (3, 8, 8))
    assert ds.train[0][0].shape == (3, 8, 8) and ds.val[0][0].shape == (3, 8, 8)  # grey -> 3 channels


def test_imagefolder_split_names_and_a_validation_split_lacking_classes(tmp_path):
    """train/test (or valid, validation) layouts are read; a validation split without some
    classes keeps the training split's label indices; one with a class of its own is refused."""
    for c in ("ant", "bee", "cat"):
        (tmp_path / "training" / c).mkdir(parents=True)
        Image.new("RGB", (9, 9), (len(c), 2, 3)).save(tmp_path / "training" / c / "x.png")
    (tmp_path / "test" / "cat").mkdir(parents=True)
    Image.new("RGB", (9, 9), (9, 9, 9)).save(tmp_path / "test" / "cat" / "y.png")
    ds = build_datasets(parse_data_spec(f"imagefolder:{tmp_path}"), (3, 8, 8))
    assert ds.class_names == ["ant", "bee", "cat"] and ds.num_classes == 3
    assert ds.val[0][1] == 2  # "cat" is class 2 of training, not class 0 of the test folder alone
    (tmp_path / "valid" / "dog").mkdir(parents=True)  # "valid" comes before "test"
    Image.new("RGB", (9, 9), (9, 9, 9)).save(tmp_path / "valid" / "dog" / "z.png")
    with pytest.raises(UserInputError, match="valid has classes that training lacks: dog"):
        build_datasets(parse_data_spec(f"imagefolder:{tmp_path}"), (3, 8, 8))


def _class_folders(root: Path, counts: dict[str, int]) -> None:
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (9, 9), (i, len(c), 3)).save(root / c / f"{i:02d}.png")


@pytest.mark.parametrize("layout", ["flat", "train_only"])
def test_imagefolder_without_a_validation_split_sets_a_tenth_of_each_class_aside(tmp_path, layout):
    """root/<class>/ or root/train/<class>/ alone: 10% of each class (at least one where it has
    two or more) validate, the same files every time, none of them trained on."""
    train_root = tmp_path if layout == "flat" else tmp_path / "train"
    _class_folders(train_root, {"ant": 20, "bee": 5, "cat": 1})
    ds = build_datasets(parse_data_spec(f"imagefolder:{tmp_path}"), (3, 8, 8))
    val_files = [p for p, _ in ds.val.base.base.samples]
    train_files = [p for p, _ in ds.train.base.base.samples]
    assert [Path(p).parent.name for p in val_files] == ["ant", "ant", "bee"]  # cat's one image trains
    assert len(train_files) == 26 - 3 and not set(val_files) & set(train_files)
    assert [y for _, y in ds.val.base.base.samples] == [0, 0, 1] and ds.class_names == ["ant", "bee", "cat"]
    assert len(ds.notes) == 1 and "3 of the 26 images" in ds.notes[0] and "no validation split" in ds.notes[0]
    again = build_datasets(parse_data_spec(f"imagefolder:{tmp_path}"), (3, 8, 8), seed=7)
    assert [p for p, _ in again.val.base.base.samples] == val_files  # not the run's seed: resumable
    if layout == "train_only":
        (tmp_path / "train").rename(tmp_path / "Train")  # a split folder in capitals is not taken for a class
        with pytest.raises(UserInputError, match="in lower case \\(found Train"):
            build_datasets(parse_data_spec(f"imagefolder:{tmp_path}"), (3, 8, 8))


def test_imagefolder_ignores_hidden_and_macos_metadata_folders(tmp_path):
    """Jupyter's .ipynb_checkpoints, .git and a zip's __MACOSX beside the classes are not classes
    (torchvision's ImageFolder takes them for classes and fails: "no valid file")."""
    for root in (tmp_path / "train", tmp_path / "val"):
        _class_folders(root, {"ant": 2, "bee": 2})
        for junk in (".ipynb_checkpoints", ".git", "__MACOSX"):
            (root / junk).mkdir()
    (tmp_path / "train" / "__MACOSX" / "._x.png").write_bytes(b"\0\5\0\7")
    ds = build_datasets(parse_data_spec(f"imagefolder:{tmp_path}"), (3, 8, 8))
    assert ds.class_names == ["ant", "bee"] and len(ds.train) == 4 and len(ds.val) == 4
    flat = tmp_path / "flat"
    _class_folders(flat, {"ant": 3, "bee": 3})
    (flat / ".ipynb_checkpoints").mkdir()
    assert build_datasets(parse_data_spec(f"imagefolder:{flat}"), (3, 8, 8)).class_names == ["ant", "bee"]


def test_imagefolder_reads_gifs_and_other_modes(tmp_path):
    # torchvision's extension list leaves GIFs out: they were skipped without a word
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            (tmp_path / split / c).mkdir(parents=True)
            pixels = rng.integers(0, 255, (11, 13, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert("P").save(tmp_path / split / c / "a.gif")
            Image.fromarray(pixels).convert("RGBA").save(tmp_path / split / c / "b.png")
            Image.fromarray(pixels).convert("CMYK").save(tmp_path / split / c / "c.jpg")
    ds = build_datasets(parse_data_spec(f"imagefolder:{tmp_path}"), (3, 8, 8))
    assert len(ds.train) == len(ds.val) == 6
    assert all(ds.train[i][0].shape == (3, 8, 8) for i in range(6))


def test_bad_specs_are_user_errors(tmp_path):
    for spec in ("mnist:/x", f"cifar10", "synthetic:classes=0", "imagefolder:/does/not/exist"):
        with pytest.raises(UserInputError):
            parse_data_spec(spec)
    with pytest.raises(UserInputError, match="cifar-10-batches-py"):
        build_datasets(parse_data_spec(f"cifar10:{tmp_path}"), (3, 32, 32))
    with pytest.raises(UserInputError, match="not found"):
        build_datasets(parse_data_spec(f"fashion-mnist:{tmp_path}"), (1, 28, 28))


def test_epoch_sampler_resumes_and_shards():
    s = EpochSampler(10, seed=5)
    s.set_epoch(2)
    full = list(s)
    assert sorted(full) == list(range(10))
    s.set_epoch(2, start=4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(3)
    assert list(s) != full
    shards = []
    for rank in range(3):
        r = EpochSampler(10, seed=5, rank=rank, world=3)
        r.set_epoch(2)
        shards.append(list(r))
    assert all(len(x) == 4 for x in shards) and set(sum(shards, [])) == set(range(10))
