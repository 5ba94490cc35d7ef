"""Build dynopool_convert/data/fashion_mnist_subset.npz from the full Fashion-MNIST IDX files.

Deterministic: a balanced subset (``--train-per-class`` from the training split, ``--val-per-class``
from the test split), picked with numpy's default_rng(seed) and stored sorted by index.

    apt-get install -y dataset-fashion-mnist
    python -m benchmarks.data.make_bundled_subset /usr/share/datasets/fashion-mnist
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dynopool_convert.training.data import BUNDLED_PATH, load_fashion_mnist


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` samples of each class, sorted."""
    picks = [np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False)) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=BUNDLED_PATH)
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    (xt, yt), (xv, yv) = load_fashion_mnist(args.root)
    rng = np.random.default_rng(args.seed)
    it, iv = balanced_subset(yt, args.train_per_class, rng), balanced_subset(yv, args.val_per_class, rng)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, train_images=xt[it], train_labels=yt[it], val_images=xv[iv], val_labels=yv[iv])
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {len(it)} train, {len(iv)} val")


if __name__ == "__main__":
    main()
