"""``npz:FILE``: images as NumPy arrays (Keras' layout), channels first or last, uint8 or floats in
[0, 1], any integer labels; the validation split made where none is given; one-line refusals."""
from __future__ import annotations

import numpy as np
import pytest

from dynopool_convert.errors import UserInputError
from dynopool_convert.training.data import build_datasets, parse_data_spec


def test_keras_layout_channels_first_floats_and_labels_that_are_not_0_to_k(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((30, 3, 12, 10)).astype(np.float32)  # channels first, floats in [0, 1]
    y = np.array([5, 7, 9] * 10)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    ds = build_datasets(parse_data_spec(f"npz:{tmp_path / 'd.npz'}"), (3, 8, 8))
    assert ds.class_names == ["5", "7", "9"] and ds.num_classes == 3 and len(ds.train) == 30 and len(ds.val) == 6
    image, label = ds.train.base[1]
    assert image.size == (10, 12) and label == 1  # PIL: width x height
    assert np.asarray(image)[0, 0].tolist() == np.round(x[1, :, 0, 0] * 255).astype(np.uint8).tolist()
    tensor, _ = ds.train[0]
    assert tensor.shape == (3, 8, 8) and not ds.notes


def test_grayscale_without_a_test_pair_sets_a_tenth_aside(tmp_path):
    np.savez(tmp_path / "g.npz", x_train=np.zeros((40, 9, 9), np.uint8), y_train=np.arange(40) % 2)
    ds = build_datasets(parse_data_spec(f"npz:{tmp_path / 'g.npz'}"), (1, 8, 8))
    assert len(ds.train) == 36 and len(ds.val) == 4 and "no validation arrays (x_val/x_test): 4 of the 40" in ds.notes[0]


@pytest.mark.parametrize("arrays,match", [
    ({"images": np.zeros((2, 4, 4), np.uint8)}, "no training arrays \\(x_train and y_train; found images\\)"),
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.zeros(3, np.int64)}, "2 images with labels of shape \\(3,\\)"),
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.zeros(2, np.float32)}, "expected one integer label"),
    ({"x_train": np.full((2, 4, 4), 3.0), "y_train": np.zeros(2, np.int64)}, "float images must be in \\[0, 1\\]"),
    ({"x_train": np.zeros((2, 4), np.uint8), "y_train": np.zeros(2, np.int64)}, "images of shape \\(2, 4\\)"),
])
def test_bad_arrays_are_refused_in_one_line(tmp_path, arrays, match):
    np.savez(tmp_path / "b.npz", **arrays)
    with pytest.raises(UserInputError, match=match):
        build_datasets(parse_data_spec(f"npz:{tmp_path / 'b.npz'}"), (1, 8, 8))
    (tmp_path / "not.npz").write_text("text")
    with pytest.raises(UserInputError, match="cannot read npz:"):
        build_datasets(parse_data_spec(f"npz:{tmp_path / 'not.npz'}"), (1, 8, 8))
