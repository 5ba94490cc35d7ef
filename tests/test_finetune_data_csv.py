"""``csv:FILE``: images listed with their labels (and splits) in a CSV file, as many downloaded
datasets come; the header's names, its absence, other separators, ids without extensions, the
validation split made where none is listed, and one-line refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynopool_convert.errors import UserInputError
from dynopool_convert.training.data import build_datasets, parse_data_spec


def _image(path: Path, value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), value, dtype=np.uint8)).convert(mode).save(path)


def _listing(tmp_path: Path, text: str) -> Path:
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    return csv


def test_a_header_names_the_columns_and_the_splits(tmp_path):
    for i in range(6):
        _image(tmp_path / "img" / f"{i}.png", 40 * i, mode="L" if i == 0 else "RGB")
    csv = _listing(tmp_path, "split,label,filename\n" + "".join(
        f"{'val' if i >= 4 else 'train'},{'dog' if i % 2 else 'cat'},img/{i}.png\n" for i in range(6)))
    ds = build_datasets(parse_data_spec(f"csv:{csv}"), (3, 8, 8))
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2 and not ds.notes
    assert [Path(p).name for p, _ in ds.train.base.base.samples] == ["0.png", "1.png", "2.png", "3.png"]
    assert [y for _, y in ds.val.base.base.samples] == [0, 1]
    x, y = ds.train[0]
    assert x.shape == (3, 8, 8) and y == 0  # a grayscale file: converted to the model's channels


def test_no_header_ids_without_extensions_semicolons_and_a_split_made_here(tmp_path):
    for i in range(20):
        _image(tmp_path / "train" / f"id{i}.jpg", 10 * i)
    csv = _listing(tmp_path / "train", "".join(f"id{i};{i % 2 + 1}\n" for i in range(20)))
    ds = build_datasets(parse_data_spec(f"csv:{csv}"), (1, 8, 8))
    assert ds.class_names == ["1", "2"]  # numeric labels in numeric order
    assert len(ds.train.base.base.samples) == 18 and len(ds.val.base.base.samples) == 2
    assert len(ds.notes) == 1 and "no validation split: 2 of the 20 images" in ds.notes[0]


@pytest.mark.parametrize("text,match", [
    ("image,label\nmissing.png,cat\n", "1 of the 1 listed images are missing, e.g. 'missing.png'"),
    ("image,label,split\na.png,cat,holdout\n", "line 2: unknown split 'holdout'"),
    ("image,kind\na.png,cat\n", "names no label column"),
    ("image,label\na.png\n", "line 2: 1 columns, expected 2"),
    ("", "lists no images"),
])
def test_bad_listings_are_refused_in_one_line(tmp_path, text, match):
    _image(tmp_path / "a.png", 1)
    with pytest.raises(UserInputError, match=match):
        build_datasets(parse_data_spec(f"csv:{_listing(tmp_path, text)}"), (3, 8, 8))


def test_the_spec_needs_a_file():
    with pytest.raises(UserInputError, match="csv file not found"):
        parse_data_spec("csv:/nope/labels.csv")
    with pytest.raises(UserInputError, match="needs a file: csv:FILE"):
        parse_data_spec("csv:")
