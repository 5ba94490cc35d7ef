"""How far a converted model is from the original at its initial strides, for models whose
resizing ops include patchify convs (kernel == stride, no padding): the patchify rule (DynOPool
resizes the conv's input to a multiple of the patch, the conv keeps its stride) against the
plain ``before`` rule (DynOPool by the stride, then the conv at stride 1).

Reported: ||converted(x) - original(x)|| / ||original(x)|| over a batch, for smooth random images
(bicubic-upsampled 8x8 noise) and real images (the bundled Fashion-MNIST subset, resized, grey
replicated to RGB). torchvision's ViT is compared before its head, which starts at zero. Weights
are random (no pretrained weights can be loaded here), so the figures
show the size of the change, not an accuracy.

    python -m benchmarks.experiments.patchify_init
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import dynopool_convert as dc
from dynopool_convert.training.data import load_bundled

MODELS = [
    ("timm:vit_tiny_patch16_224", {"dynamic_img_size": True}, 64),
    ("timm:convnext_atto", {}, 64),
    ("torchvision:vit_b_16", {"image_size": 64}, 64),
]


def _inputs(size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.randn(8, 3, 8, 8, generator=gen), size=(size, size), mode="bicubic", align_corners=False)
    (_, _), (images, _) = load_bundled()
    real = torch.from_numpy(images[:8]).float().div(255.0).reshape(8, 1, 28, 28)
    real = F.interpolate(real, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return {"smooth noise": smooth, "Fashion-MNIST": (real - 0.5) / 0.25}


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("| model | input | patchify rule | plain `before` rule |")
    print("|---|---|---:|---:|")
    for source, args, size in MODELS:
        torch.manual_seed(0)
        model = dc.build_model(source, args).eval()
        if source.startswith("torchvision:vit"):
            model.heads = torch.nn.Identity()  # its head starts at zero: compare the class token's features
        converted = {p: dc.convert(model, (3, size, size), patchify=p).model.eval() for p in (True, False)}
        for label, x in _inputs(size).items():
            with torch.no_grad():
                ref = model(x)
                rel = {p: float((m(x) - ref).norm() / ref.norm()) for p, m in converted.items()}
            print(f"| {source} | {label} | {rel[True]:.3f} | {rel[False]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
