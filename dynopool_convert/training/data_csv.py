"""Images listed in a CSV file: ``csv:FILE`` (the layout of many Kaggle-style datasets).

One row per image: its path (relative to the CSV file's folder, or absolute; a name without an
extension is looked up with the usual image extensions, as listings by image id give it) and its
label (any text or number: the classes are the sorted labels), and optionally its split
(``train``/``training``; ``val``/``valid``/``validation``/``test``). A header row names the
columns (``image``, ``file``, ``filename``, ``path``, ``id``, ...; ``label``, ``class``,
``target``, ...; ``split``, ``set``, ``subset``); without one, the columns are path, label[, split].
Comma, semicolon and tab separators are recognised. Without a validation split, a tenth of each
class is set aside, as for image folders. A listed file that is missing is refused, naming it.
"""
from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserInputError
from .image_files import TRAIN_SPLITS, VAL_FROM_TRAIN, VAL_SPLITS, split_off_validation

__all__ = ["csv_splits", "ListedImages"]

IMAGE_COLUMNS = ("image", "file", "filename", "file_name", "path", "filepath", "image_path", "img", "image_id", "id")
LABEL_COLUMNS = ("label", "class", "target", "category", "class_name", "y", "labels")
SPLIT_COLUMNS = ("split", "set", "subset")
_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ListedImages(Dataset):
    """``(PIL image, class index)`` for each ``(path, index)`` of ``samples``, as ImageFolder gives them."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]) -> None:
        self.samples = self.imgs = samples
        self.targets = [i for _, i in samples]
        self.classes, self.class_to_idx = classes, {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[Image.Image, int]:
        path, label = self.samples[idx]
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB"), label


def _rows(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"cannot read csv:{path}: {err}") from err
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    return [[cell.strip() for cell in row] for row in csv.reader(text.splitlines(), dialect) if any(c.strip() for c in row)]


def _columns(first: list[str]) -> tuple[int, int, int | None, bool]:
    """(image, label, split) column indices, and whether the first row is a header."""
    names = [c.lower() for c in first]
    find = lambda options: next((names.index(o) for o in options if o in names), None)  # noqa: E731
    image, label, split = find(IMAGE_COLUMNS), find(LABEL_COLUMNS), find(SPLIT_COLUMNS)
    if image is not None and label is not None:
        return image, label, split, True
    if image is not None or label is not None:
        raise UserInputError(f"the csv header {first} names no {'label' if label is None else 'image'} column: "
                             f"use one of {', '.join(LABEL_COLUMNS if label is None else IMAGE_COLUMNS)}")
    return 0, 1, 2 if len(first) > 2 else None, False


def _resolve(base: Path, name: str) -> Path | None:
    path = Path(name).expanduser()
    path = path if path.is_absolute() else base / path
    if path.is_file():
        return path
    if not path.suffix:
        return next((p for p in (path.with_suffix(e) for e in _EXTENSIONS) if p.is_file()), None)
    return None


def _split_of(value: str, file: Path, line: int) -> str:
    v = value.lower()
    if v in TRAIN_SPLITS:
        return "train"
    if v in VAL_SPLITS:
        return "val"
    raise UserInputError(f"csv:{file} line {line}: unknown split {value!r} (use {'/'.join(TRAIN_SPLITS)} or {'/'.join(VAL_SPLITS)})")


def _label_order(label: str) -> tuple[bool, int, str]:
    """Integer labels first, in numeric order; then the others, alphabetically."""
    number = label.lstrip("-").isdigit()
    return not number, int(label) if number else 0, label


def csv_splits(file: Path) -> tuple[ListedImages, ListedImages, str | None]:
    """The train and validation datasets listed in ``file``, and a note when the validation split
    was made here (``VAL_FROM_TRAIN`` of each class, the same images every run)."""
    rows = _rows(file)
    if not rows:
        raise UserInputError(f"csv:{file} lists no images")
    image, label, split, header = _columns(rows[0])
    listed, missing = [], []
    for line, row in enumerate(rows[1:] if header else rows, start=2 if header else 1):
        if len(row) <= max(image, label, split or 0):
            raise UserInputError(f"csv:{file} line {line}: {len(row)} columns, expected {max(image, label, split or 0) + 1}")
        found = _resolve(file.parent, row[image])
        if found is None:
            missing.append(row[image])
        listed.append((str(found), row[label], _split_of(row[split], file, line) if split is not None else "train"))
    if missing:
        raise UserInputError(f"csv:{file}: {len(missing)} of the {len(listed)} listed images are missing, e.g. "
                             f"{missing[0]!r} (paths are read relative to {file.parent})")
    labels = sorted({lab for _, lab, _ in listed}, key=_label_order)
    index = {lab: i for i, lab in enumerate(labels)}
    by_split = {s: [(p, index[lab]) for p, lab, sp in listed if sp == s] for s in ("train", "val")}
    if not by_split["train"]:
        raise UserInputError(f"csv:{file} lists no training images")
    train = ListedImages(by_split["train"], labels)
    if by_split["val"]:
        return train, ListedImages(by_split["val"], labels), None
    train, val = split_off_validation(train)
    if not val.samples:
        raise UserInputError(f"csv:{file} has no validation split, and no class has two images to set one aside")
    return train, val, (f"note: csv:{file} has no validation split: {len(val.samples)} of the "
                        f"{len(train.samples) + len(val.samples)} images ({VAL_FROM_TRAIN:.0%} of each class) are set "
                        f"aside to validate, the same ones every run")
