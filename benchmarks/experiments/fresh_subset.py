"""Write N Fashion-MNIST training images that are not in the bundled subset as an IDX folder.

A model trained on the bundled subset can then be fine-tuned on images it never saw
(``--data fashion-mnist:OUT``); the t10k files are copied beside them, so validation is the
full 10k test split. Used by docs/RESULTS.md §7.

    python -m benchmarks.experiments.fresh_subset /usr/share/datasets/fashion-mnist /tmp/fm_new --count 6000 --seed 2026
"""
from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np

from dynopool_convert.training.data import BUNDLED_PATH, read_idx


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (gzip), as Fashion-MNIST ships."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path, help="Fashion-MNIST folder (train-*/t10k-* IDX files)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    images = np.asarray(read_idx(args.source / "train-images-idx3-ubyte.gz"))
    labels = np.asarray(read_idx(args.source / "train-labels-idx1-ubyte.gz"))
    bundled = np.load(BUNDLED_PATH)
    seen = {a.tobytes() for key in ("train_images", "val_images") for a in bundled[key]}
    fresh = [i for i in range(len(images)) if images[i].tobytes() not in seen]
    pick = np.sort(np.random.default_rng(args.seed).choice(fresh, args.count, replace=False))
    args.out.mkdir(parents=True, exist_ok=True)
    write_idx(args.out / "train-images-idx3-ubyte.gz", images[pick])
    write_idx(args.out / "train-labels-idx1-ubyte.gz", labels[pick])
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(args.source / name, args.out / name)
    print(f"{args.count} of the {len(fresh)} training images not in the bundled subset -> {args.out}")


if __name__ == "__main__":
    main()
