"""Image files on disk as datasets: class folders (``imagefolder:DIR``), the split made where a
folder has no validation split, and unreadable files skipped."""
from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

from ..errors import UserInputError

__all__ = ["TRAIN_SPLITS", "VAL_SPLITS", "VAL_FROM_TRAIN", "imagefolder_splits", "split_off_validation", "set_samples"]

TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("val", "valid", "validation", "test")  # the first found is the validation split


def _split_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


#: share of each class's training images set aside as validation where a folder has no validation split
VAL_FROM_TRAIN = 0.1


def imagefolder_splits(root: Path) -> tuple[Any, Any, str | None]:
    """The train and validation ImageFolders of ``root``, and a note when the validation split was
    made here; the validation split may lack some of the training classes (a small split), and
    its labels follow the training split's indices.

    Without a validation folder, ``VAL_FROM_TRAIN`` of each class's training images (at least one
    of a class with two or more) become the validation split: always the same images (a fixed
    draw over the sorted file list), so a resumed run scores the same ones. Without a training
    folder either, ``root``'s own class folders are the training data."""
    train_dir, val_dir = _split_dir(root, TRAIN_SPLITS), _split_dir(root, VAL_SPLITS)
    if train_dir is None and val_dir is None and _has_class_folders(root):
        splits_named = [p.name for p in root.iterdir() if p.is_dir() and p.name.lower() in TRAIN_SPLITS + VAL_SPLITS]
        if splits_named:  # "Train"/"Val": split folders, not classes
            raise UserInputError(f"imagefolder:{root}: name its splits {'/'.join(TRAIN_SPLITS)} and {'/'.join(VAL_SPLITS)} "
                                 f"in lower case (found {', '.join(sorted(splits_named))}; read as classes otherwise)")
        train_dir = root
    if train_dir is None:
        raise UserInputError(f"imagefolder:{root} needs {root}/<class>/<images>, or a training split in "
                             f"{'/'.join(TRAIN_SPLITS)} (and a validation split in {'/'.join(VAL_SPLITS)}, else "
                             f"{VAL_FROM_TRAIN:.0%} of the training images are set aside)")
    splits = []
    for folder in (train_dir, val_dir):
        try:
            splits.append(None if folder is None else _image_folder(str(folder)))
        except FileNotFoundError as err:
            raise UserInputError(f"no images in {folder}: {err}") from err
    train, val = splits
    if val is None:
        train, val = split_off_validation(train)
        if not val.samples:
            raise UserInputError(f"imagefolder:{root} has no validation split ({'/'.join(VAL_SPLITS)}), and no class "
                                 f"of its training images has two images to set one aside")
        where = "its class folders" if train_dir == root else f"{train_dir.name}/"
        return train, val, (f"note: imagefolder:{root} has no validation split: {len(val.samples)} of the "
                            f"{len(train.samples) + len(val.samples)} images of {where} ({VAL_FROM_TRAIN:.0%} of each class) "
                            f"are set aside to validate, the same ones every run")
    unknown = sorted(set(val.classes) - set(train.classes))
    if unknown:
        raise UserInputError(f"imagefolder:{root}: {val_dir.name} has classes that {train_dir.name} lacks: "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    if val.class_to_idx != {c: train.class_to_idx[c] for c in val.classes}:
        set_samples(val, [(path, train.class_to_idx[val.classes[i]]) for path, i in val.samples])
        val.classes, val.class_to_idx = list(train.classes), dict(train.class_to_idx)
    return train, val, None


def _is_class_folder(path: Path) -> bool:
    """A folder that names a class: not hidden (``.ipynb_checkpoints``, ``.git``) nor macOS's
    archive metadata (``__MACOSX``), which torchvision's ImageFolder would read as classes."""
    return path.is_dir() and not path.name.startswith(".") and path.name != "__MACOSX"


def _has_class_folders(root: Path) -> bool:
    return any(_is_class_folder(p) for p in root.iterdir())


def _image_folder(root: str) -> Any:
    """torchvision's ImageFolder over ``root``'s class folders (``_is_class_folder``), GIFs included."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, ImageFolder

    class ClassFolders(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = sorted(p.name for p in Path(directory).iterdir() if _is_class_folder(p))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: i for i, name in enumerate(classes)}

    return ClassFolders(root, is_valid_file=lambda path: path.lower().endswith((*IMG_EXTENSIONS, ".gif")))


def set_samples(folder: Any, samples: list[tuple[str, int]]) -> None:
    folder.samples = folder.imgs = samples
    folder.targets = [i for _, i in samples]


def split_off_validation(train: Any) -> tuple[Any, Any]:
    """``train`` split in two ImageFolders by class (``VAL_FROM_TRAIN`` each, a fixed draw)."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in sorted(train.samples):
        by_class.setdefault(sample[1], []).append(sample)
    rng = random.Random(0)
    kept, held = [], []
    for label in sorted(by_class):
        samples = by_class[label]
        k = max(1, round(VAL_FROM_TRAIN * len(samples))) if len(samples) > 1 else 0
        chosen = set(rng.sample(range(len(samples)), k))
        kept += [s for i, s in enumerate(samples) if i not in chosen]
        held += [s for i, s in enumerate(samples) if i in chosen]
    val = copy.copy(train)
    set_samples(train, kept)
    set_samples(val, held)
    return train, val
