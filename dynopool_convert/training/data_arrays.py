"""Images as NumPy arrays in one ``.npz`` file: ``npz:FILE`` (Keras' ``mnist.npz`` layout, or what
``np.savez(f, x_train=..., y_train=..., x_test=..., y_test=...)`` writes).

Keys: ``x_train``/``y_train`` and ``x_val``/``y_val`` or ``x_test``/``y_test`` (also
``train_images``/``train_labels``, ``val_images``/``val_labels``: the bundled subset's). Images
``N x H x W``, ``N x H x W x C`` or ``N x C x H x W`` (C of 1, 3 or 4), uint8, or floats in
[0, 1] (scaled to 0..255); labels any integers (the classes are the sorted labels). Without a
validation pair, a tenth of each class is set aside (the same images every run).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserInputError
from .image_files import VAL_FROM_TRAIN

__all__ = ["npz_arrays"]

_TRAIN = (("x_train", "y_train"), ("train_images", "train_labels"))
_VAL = (("x_val", "y_val"), ("x_test", "y_test"), ("val_images", "val_labels"))


def _pair(z: np.lib.npyio.NpzFile, options: tuple[tuple[str, str], ...]) -> tuple[np.ndarray, np.ndarray] | None:
    for x, y in options:
        if x in z.files and y in z.files:
            return z[x], z[y]
    return None


def _as_images(x: np.ndarray, file: Path) -> np.ndarray:
    """uint8, ``N x H x W`` or ``N x H x W x C``."""
    if x.ndim == 4 and x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        x = x.transpose(0, 2, 3, 1)  # channels first
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (3, 4):
        raise UserInputError(f"npz:{file}: images of shape {x.shape}; expected N x H x W, N x H x W x C or N x C x H x W")
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1):
            raise UserInputError(f"npz:{file}: float images must be in [0, 1] (found {np.nanmin(x):.3g} .. {np.nanmax(x):.3g})")
        x = np.round(x * 255)
    return x.astype(np.uint8)


def _holdout(labels: np.ndarray) -> np.ndarray:
    """A boolean mask of ``VAL_FROM_TRAIN`` of each class (at least one of a class of two or more)."""
    rng, held = np.random.default_rng(0), np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        if len(where) > 1:
            held[rng.choice(where, max(1, round(VAL_FROM_TRAIN * len(where))), replace=False)] = True
    return held


def npz_arrays(file: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str], str | None]:
    """((train images, labels), (val images, labels)), the class names, and a note when the
    validation split was made here."""
    try:
        z = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserInputError(f"cannot read npz:{file}: {err}") from err
    with z:
        train, val = _pair(z, _TRAIN), _pair(z, _VAL)
        if train is None:
            raise UserInputError(f"npz:{file} has no training arrays (x_train and y_train; found {', '.join(z.files) or 'none'})")
        pairs = [train] + ([val] if val is not None else [])
        for x, y in pairs:
            if y.ndim != 1 or len(x) != len(y) or not np.issubdtype(y.dtype, np.integer):
                raise UserInputError(f"npz:{file}: {len(x)} images with labels of shape {y.shape} and type {y.dtype}; "
                                     f"expected one integer label per image")
        classes = np.unique(np.concatenate([y for _, y in pairs]))
        index = {int(c): i for i, c in enumerate(classes)}
        (xt, yt), note = (_as_images(train[0], file), np.array([index[int(v)] for v in train[1]])), None
        if val is None:
            held = _holdout(yt)
            if not held.any():
                raise UserInputError(f"npz:{file} has no validation arrays, and no class has two images to set one aside")
            note = (f"note: npz:{file} has no validation arrays (x_val/x_test): {int(held.sum())} of the {len(yt)} "
                    f"images ({VAL_FROM_TRAIN:.0%} of each class) are set aside to validate, the same ones every run")
            (xt, yt), (xv, yv) = (xt[~held], yt[~held]), (xt[held], yt[held])
        else:
            xv, yv = _as_images(val[0], file), np.array([index[int(v)] for v in val[1]])
    return (xt, yt), (xv, yv), [str(int(c)) for c in classes], note
