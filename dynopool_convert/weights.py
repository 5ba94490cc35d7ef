"""Weights in: a user's state dict file, or the libraries' own pretrained weights (DESIGN.md §6).

``load_weights_file(model, path)`` reads a ``.safetensors`` file or a ``torch.save`` file
(``weights_only=True``: tensors and plain data, never code), unwraps ``state_dict``/``model``/
``module`` wrappers and ``module.``/``model.`` key prefixes, tries timm's own checkpoint filter
for layouts of the original repositories, and loads strictly. A mismatch is one line naming the
first missing and unexpected keys, or the first tensor of the wrong shape.

``build_pretrained(source, build_args)`` builds a timm or torchvision model with its pretrained
weights from the local caches only (nothing is downloaded): not cached is one clear error.

Both return the weights' origin, plain data for the checkpoint (``path`` and ``sha256``, or the
pretrained tag and its cached file).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserInputError

__all__ = ["read_state_dict", "load_weights_file", "load_state_dict_matching", "build_pretrained", "build_with_weights",
           "default_placement", "file_sha256"]

#: keys under which training scripts nest the state dict (checked in this order, repeatedly)
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")
#: names timm's model modules give their filters from original-repository layouts to timm's
_TIMM_FILTERS = ("checkpoint_filter_fn", "_filter_fn", "filter_fn")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a weights file (``.safetensors``, else ``torch.load(weights_only=True)``),
    wrappers removed; UserInputError (one line) for a missing, unreadable or unsafe file."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"weights file {str(path)!r} does not exist")
    if not path.is_file():
        raise UserInputError(f"weights file {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise UserInputError(f"{str(path)!r} is not a readable safetensors file: {' '.join(str(err).split())[:160]}") from err
    else:
        from .checkpoint import _torch_load

        data = _torch_load(path, what="weights file")
    return _unwrap(data, path)


def _unwrap(data: Any, path: Path) -> dict[str, Tensor]:
    while isinstance(data, dict) and not _all_tensors(data):
        inner = next((data[k] for k in _WRAPPERS if isinstance(data.get(k), dict)), None)
        if inner is None:
            break
        data = inner
    if not isinstance(data, dict) or not data or not _all_tensors(data):
        raise UserInputError(
            f"{str(path)!r} holds no state dict (a mapping of parameter names to tensors, possibly under "
            f"{'/'.join(repr(k) for k in _WRAPPERS[:4])})"
        )
    return dict(data)


def _all_tensors(data: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items())


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor] | None:
    if not all(k.startswith(prefix) for k in state):
        return None
    return {k[len(prefix):]: v for k, v in state.items()}


def _layouts(state: dict[str, Tensor], model: nn.Module) -> list[dict[str, Tensor]]:
    """The file's keys as they are, without wrapper prefixes, and through timm's checkpoint filter."""
    found = [state]
    for candidate in list(found):
        for prefix in _PREFIXES:
            stripped = _strip(candidate, prefix)
            if stripped is not None:
                found.append(stripped)
                again = [s for p in _PREFIXES if (s := _strip(stripped, p)) is not None]
                found += again
    if not type(model).__module__.startswith("timm."):
        return found
    module = sys.modules.get(type(model).__module__)
    filters = [f for name in _TIMM_FILTERS if callable(f := getattr(module, name, None))]
    for filter_fn, candidate in [(f, c) for f in filters for c in list(found)]:
        for args in ((dict(candidate), model), (dict(candidate),)):
            try:
                filtered = filter_fn(*args)
            except Exception:  # a filter for another layout or signature: not this one
                continue
            if isinstance(filtered, dict) and _all_tensors(filtered):
                found.append(filtered)
            break
    return found


def load_state_dict_matching(model: nn.Module, state: dict[str, Tensor], label: str, model_label: str) -> None:
    """Load ``state`` into ``model`` strictly, under the key layout that matches it best;
    UserInputError naming the first missing/unexpected key or the first wrong shape."""
    expected = model.state_dict()
    layouts = _layouts(state, model)
    best = max(layouts, key=lambda s: (len(expected.keys() & s.keys()), -len(s.keys() - expected.keys())))
    missing = [k for k in expected if k not in best]
    unexpected = [k for k in best if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[0]!r}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        raise UserInputError(f"{label} do not match {model_label}: {', '.join(parts)}")
    for key, value in expected.items():
        if tuple(best[key].shape) != tuple(value.shape):
            raise UserInputError(
                f"{label} do not fit {model_label}: {key!r} has shape {list(best[key].shape)} in the file, "
                f"{list(value.shape)} in the model (a different variant or class count? see --build-arg num_classes=...)"
            )
    model.load_state_dict(best, strict=True)


def load_weights_file(model: nn.Module, path: str | os.PathLike, model_label: str = "the model") -> dict[str, Any]:
    """Load the weights file ``path`` into ``model`` (in place); returns their origin
    ``{"path": absolute path, "sha256": hex digest}``."""
    state = read_state_dict(path)
    load_state_dict_matching(model, state, f"the weights in {str(path)!r}", model_label)
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def build_pretrained(source: str, build_args: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``source`` built with its library's default pretrained weights, read from the local
    cache only; returns the model and the weights' origin (tag, cached file and its sha256)."""
    from .models import build_model, resolve_source

    source = resolve_source(source)
    args = dict(build_args or {})
    kind, name = source.split(":", 1)
    if kind == "timm":
        file, tag = _timm_cached_file(name)
        model = build_model(source, args)
        state = read_state_dict(file)
        load_state_dict_matching(model, state, f"the pretrained weights {tag!r}", source)
    elif kind == "torchvision":
        file, tag = _torchvision_cached_file(name)
        model = build_model(source, args)
        load_state_dict_matching(model, read_state_dict(file), f"the pretrained weights {tag!r}", source)
    else:
        raise UserInputError(f"--pretrained needs a timm or torchvision model, not {source!r}: pass --weights FILE")
    return model, {"pretrained": tag, "path": str(file), "sha256": file_sha256(file)}


def build_with_weights(source: str, build_args: dict[str, Any] | None = None, weights: str | os.PathLike | None = None,
                       pretrained: bool = False) -> tuple[nn.Module, dict[str, Any] | None]:
    """Build ``source`` with random weights, the weights file ``weights``, or (``pretrained``)
    its library's cached pretrained weights; returns the model and the weights' origin (None
    for random weights)."""
    from . import build_model  # the package's name, looked up at call time (as the CLI's is)
    from .models import resolve_source

    if weights is not None and pretrained:
        raise UserInputError("give either --weights FILE or --pretrained, not both")
    if pretrained:
        return build_pretrained(source, build_args)
    model = build_model(source, build_args)
    if weights is None:
        return model, None
    return model, load_weights_file(model, weights, resolve_source(source))


def default_placement(origin: dict[str, Any] | None) -> str:
    """``exact`` when weights were loaded (the converted model starts as the trained one),
    ``before`` for random weights."""
    return "exact" if origin else "before"


def _not_cached(tag: str, where: str) -> UserInputError:
    return UserInputError(
        f"the pretrained weights {tag!r} are not in the local cache ({where}) and nothing is downloaded here; "
        "download them where there is a network, or pass --weights FILE"
    )


def _timm_cached_file(name: str) -> tuple[Path, str]:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise UserInputError(f"timm has no pretrained weights for {name!r}")
    tag = name if "." in name or not getattr(cfg, "tag", None) else f"{name}.{cfg.tag}"
    if getattr(cfg, "file", None) and Path(cfg.file).is_file():
        return Path(cfg.file), tag
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        for filename in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(cached, str) and Path(cached).is_file():
                return Path(cached), tag
        raise _not_cached(tag, f"Hugging Face hub cache, repository {repo}")
    url = getattr(cfg, "url", None)
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
        if cached.is_file():
            return cached, tag
        raise _not_cached(tag, str(cached))
    raise UserInputError(f"timm has no pretrained weights for {name!r}")


def _torchvision_cached_file(name: str) -> tuple[Path, str]:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError) as err:
        raise UserInputError(f"torchvision has no pretrained weights for {name!r}") from err
    tag = f"torchvision:{name}.{weights.name}"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file():
        raise _not_cached(tag, str(cached))
    return cached, tag
