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
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserInputError

__all__ = ["read_state_dict", "load_weights_file", "load_state_dict_matching", "build_pretrained", "build_with_weights",
           "default_placement", "file_sha256", "weights_note"]

#: keys under which training scripts nest the state dict (checked in this order, repeatedly)
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")
#: names timm's model modules give their filters from original-repository layouts to timm's
_TIMM_FILTERS = ("checkpoint_filter_fn", "_filter_fn", "filter_fn", "_filter_torchvision_pretrained")
#: build arguments torchvision's builders set when they load torchvision's own weights (its
#: googlenet/inception_v3 builders: those weights expect ``transform_input=True``)
_TORCHVISION_RELEASE_ARGS = {"googlenet": {"transform_input": True}, "inception_v3": {"transform_input": True}}


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
    state = OrderedDict(data)
    metadata = getattr(data, "_metadata", None)  # torch.save keeps each module's version here
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    return state


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
    found += [remapped for candidate in list(found) if (remapped := _torchvision_remap(candidate, model)) is not None]
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


def _torchvision_remap(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor] | None:
    """torchvision's own key remapping of its older checkpoints (DenseNet's ``norm.1`` ->
    ``norm1``, done by its loader ``densenet._load_state_dict``); None for other models."""
    if type(model).__module__ != "torchvision.models.densenet":
        return None
    from torchvision.models import densenet

    loader = getattr(densenet, "_load_state_dict", None)
    if loader is None:  # another torchvision: its current layout only
        return None
    remapped: dict[str, Tensor] = {}

    class _Weights:  # what the loader reads from a WeightsEnum
        @staticmethod
        def get_state_dict(**_: Any) -> dict[str, Tensor]:
            return dict(state)

    class _Into:  # what the loader loads into: keep the remapped dict
        @staticmethod
        def load_state_dict(remapped_state: dict[str, Tensor], *_: Any, **__: Any) -> None:
            remapped.update(remapped_state)

    loader(_Into(), _Weights(), progress=False)
    return remapped


def _torchvision_release(source: str, path: str | os.PathLike) -> str | None:
    """The tag of torchvision's own weights for ``source`` when the file ``path`` is one of them
    (its release files are named after their sha256's first hex digits), else None. Only
    checked for the models whose builders set arguments for those weights."""
    kind, _, name = source.partition(":")
    if kind != "torchvision" or name not in _TORCHVISION_RELEASE_ARGS or not Path(path).is_file():
        return None
    import torchvision

    digest = file_sha256(path)
    for weights in torchvision.models.get_model_weights(name):
        digits = os.path.basename(weights.url).rsplit("-", 1)[-1].split(".")[0].lower()
        if len(digits) >= 8 and digest.startswith(digits):
            return f"{source}.{weights.name}"
    return None


def _release_build_args(source: str, build_args: dict[str, Any]) -> dict[str, Any]:
    """The arguments torchvision's builder sets for its own weights (``transform_input`` of
    googlenet/inception_v3) that ``build_args`` does not set; added to ``build_args`` in place
    (so that a checkpoint rebuilds the same model) and returned."""
    wanted = _TORCHVISION_RELEASE_ARGS.get(source.split(":", 1)[1], {}) if source.startswith("torchvision:") else {}
    added = {k: v for k, v in wanted.items() if k not in build_args}
    build_args.update(added)
    return added


def load_state_dict_matching(model: nn.Module, state: dict[str, Tensor], label: str, model_label: str) -> None:
    """Load ``state`` into ``model`` strictly, under the key layout that matches it best;
    UserInputError naming the first missing/unexpected key or the first wrong shape."""
    expected = model.state_dict()
    layouts = _layouts(state, model)
    best = max(layouts, key=lambda s: (len(expected.keys() & s.keys()), -len(s.keys() - expected.keys())))
    # files from before PyTorch 0.4.1 (torchvision's first releases) have no num_batches_tracked:
    # batch norm's own loader fills it in, as it does for torchvision's builders
    missing = [k for k in expected if k not in best and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in best if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[0]!r}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        raise UserInputError(f"{label} do not match {model_label}: {', '.join(parts)}")
    wrong = [k for k, value in expected.items() if k in best and tuple(best[k].shape) != tuple(value.shape)]
    if wrong:
        key = wrong[0]
        raise UserInputError(
            f"{label} do not fit {model_label}: {key!r} has shape {list(best[key].shape)} in the file, "
            f"{list(expected[key].shape)} in the model ({_shape_hint(model, {k: best[k] for k in wrong}, expected)})"
        )
    model.load_state_dict(_with_versions(best, state, expected), strict=True)


def _shape_hint(model: nn.Module, wrong: dict[str, Tensor], expected: dict[str, Tensor]) -> str:
    """What a shape mismatch most likely means: where only the classifier differs (the model's last
    Linear, or timm's ``get_classifier()``, in its rows alone), the class count to build it with."""
    owners = {key.rsplit(".", 1)[0] for key in wrong}
    rows = {int(t.shape[0]) if t.dim() else -1 for t in wrong.values()}
    only_rows = all(t.dim() and tuple(t.shape[1:]) == tuple(expected[k].shape[1:]) for k, t in wrong.items())
    whole = all(k in wrong for k in expected if k.rsplit(".", 1)[0] in owners)  # weight and bias alike
    if len(owners) == 1 and len(rows) == 1 and only_rows and whole:
        owner = model.get_submodule(owners.pop())
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        get = getattr(model, "get_classifier", None)
        classifier = get() if callable(get) else (linears[-1] if linears else None)
        if owner is classifier:
            classes = rows.pop()
            return f"its classifier has {classes} classes: add --build-arg num_classes={classes}"
    return "a different variant or class count? see --build-arg num_classes=..."


def _with_versions(best: dict[str, Tensor], state: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """``best`` with the module versions ``load_state_dict`` hands each module's loader: the file's
    own when its keys were used as they are, else (safetensors files, remapped keys) the model's,
    as a file saved from this model would carry (torchvision's MNASNet refuses a load without),
    except for modules some of whose keys the file lacks: they get none, as a file from before
    their versions (batch norm then fills in ``num_batches_tracked``)."""
    out = OrderedDict(best)
    metadata = getattr(state, "_metadata", None) if best is state else None
    if metadata is None:
        metadata = OrderedDict((prefix, dict(meta)) for prefix, meta in getattr(expected, "_metadata", {}).items())
        for key in expected.keys() - best.keys():
            metadata.get(key.rpartition(".")[0], {}).pop("version", None)
    out._metadata = metadata  # type: ignore[attr-defined]
    return out


def load_weights_file(model: nn.Module, path: str | os.PathLike, model_label: str = "the model") -> dict[str, Any]:
    """Load the weights file ``path`` into ``model`` (in place); returns their origin
    ``{"path": absolute path, "sha256": hex digest}``."""
    state = read_state_dict(path)
    load_state_dict_matching(model, state, f"the weights in {str(path)!r}", model_label)
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def build_pretrained(source: str, build_args: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``source`` built with its library's default pretrained weights, read from the local
    cache only; returns the model and the weights' origin (tag, cached file and its sha256).
    torchvision's builder arguments for its weights are added to ``build_args`` (see
    :func:`build_with_weights`)."""
    from .models import build_model, resolve_source

    source = resolve_source(source)
    args = build_args if build_args is not None else {}
    kind, name = source.split(":", 1)
    added: dict[str, Any] = {}
    if kind == "timm":
        file, tag = _timm_cached_file(name)
        model = build_model(source, args)
        state = read_state_dict(file)
        load_state_dict_matching(model, state, f"the pretrained weights {tag!r}", source)
    elif kind == "torchvision":
        file, tag = _torchvision_cached_file(name)
        added = _release_build_args(source, args)
        model = build_model(source, args)
        load_state_dict_matching(model, read_state_dict(file), f"the pretrained weights {tag!r}", source)
    else:
        raise UserInputError(f"--pretrained needs a timm or torchvision model, not {source!r}: pass --weights FILE")
    origin = {"pretrained": tag, "path": str(file), "sha256": file_sha256(file)}
    return model, {**origin, "build_args": added} if added else origin


def build_with_weights(source: str, build_args: dict[str, Any] | None = None, weights: str | os.PathLike | None = None,
                       pretrained: bool = False) -> tuple[nn.Module, dict[str, Any] | None]:
    """Build ``source`` with random weights, the weights file ``weights``, or (``pretrained``)
    its library's cached pretrained weights; returns the model and the weights' origin (None
    for random weights).

    torchvision's own weights (``pretrained``, or a file with the hash of one of its releases)
    get the build arguments torchvision's builder gives them (``transform_input=True`` for
    googlenet/inception_v3) where ``build_args`` does not set them: they are added to
    ``build_args`` in place and to the origin (``build_args``), so that a checkpoint rebuilds
    the same model.
    """
    from . import build_model  # the package's name, looked up at call time (as the CLI's is)
    from .models import resolve_source

    if weights is not None and pretrained:
        raise UserInputError("give either --weights FILE or --pretrained, not both")
    if pretrained:
        return build_pretrained(source, build_args)
    if weights is None:
        return build_model(source, build_args), None
    resolved = resolve_source(source)
    args = build_args if build_args is not None else {}
    release = _torchvision_release(resolved, weights)
    added = _release_build_args(resolved, args) if release else {}
    model = build_model(source, args)
    origin = load_weights_file(model, weights, resolved)
    if release:
        origin["release"] = release
    return model, {**origin, "build_args": added} if added else origin


def weights_note(source: str, build_args: dict[str, Any], origin: dict[str, Any] | None) -> str | None:
    """One line on the build arguments that loaded weights depend on (torchvision's
    ``transform_input``): set for torchvision's own weights, or left as built for a user's."""
    if origin is None:
        return None
    if origin.get("build_args"):
        added = ", ".join(f"{k}={v}" for k, v in origin["build_args"].items())
        return f"built with {added}, as torchvision builds the model for its own weights"
    name = source.split(":", 1)[1] if source.startswith("torchvision:") else None
    unset = [k for k in _TORCHVISION_RELEASE_ARGS.get(name, {}) if k not in build_args]
    if unset:
        key = unset[0]
        return (f"built with {key}=False (the builder's default); weights fine-tuned from torchvision's own "
                f"expect {key}=True: --build-arg {key}=true")
    return None


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
