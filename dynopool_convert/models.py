"""Model sources: ``timm:NAME``, ``torchvision:NAME``, ``package.module:factory`` (DESIGN.md §4).

Bare names try timm first, then torchvision. Nothing is ever downloaded: timm models are built
with ``pretrained=False``, torchvision models with ``weights=None`` (and ``weights_backbone=None``
where the builder takes it, e.g. the segmentation builders, which would fetch a backbone
otherwise).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from .errors import UserInputError
from .sizes import complete_size, parse_size

__all__ = ["resolve_source", "build_model", "is_trusted_source", "model_label", "default_input_size", "parse_input_size", "parse_build_args"]

_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


@lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models())


@lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def _is_timm(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def _unknown(name: str, where: str) -> UserInputError:
    pool = {"timm": _timm_names(), "torchvision": _torchvision_names()}.get(where)
    names = pool if pool is not None else tuple(dict.fromkeys(_timm_names() + _torchvision_names()))
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    scope = f"{where} model" if pool is not None else "model (not in timm nor torchvision)"
    return UserInputError(
        f"unknown {scope} {name!r}{hint} (accepted: NAME, timm:NAME, torchvision:NAME, package.module:factory or path/to/file.py:factory)"
    )


def resolve_source(name: str) -> str:
    """Canonical source string for a user-given model name.

    >>> resolve_source("resnet18"), resolve_source("torchvision:vgg11")
    ('timm:resnet18', 'torchvision:vgg11')
    """
    name = name.strip()
    if name.startswith("timm:"):
        model = name[5:]
        if not _is_timm(model):
            raise _unknown(model, "timm")
        return name
    if name.startswith("torchvision:"):
        model = name[len("torchvision:"):]
        if model not in _torchvision_names():
            raise _unknown(model, "torchvision")
        return name
    if ":" in name:
        file, _, factory = name.rpartition(":")
        if file.endswith(".py") and re.fullmatch(r"[A-Za-z_]\w*", factory):
            path = Path(file).expanduser()
            if not path.is_file():
                raise UserInputError(f"model file not found: {path} (model source {name!r})")
            return f"{path.resolve()}:{factory}"  # absolute: checkpoints load from any folder
        if not _FACTORY.match(name):
            raise UserInputError(f"model source {name!r} is not of the form package.module:factory or path/to/file.py:factory")
        return name
    if _is_timm(name):
        return f"timm:{name}"
    if name in _torchvision_names():
        return f"torchvision:{name}"
    raise _unknown(name, "any")


#: Sources that need no trust flag: the two model zoos and the small models bundled with dynopool.
TRUSTED_PREFIXES = ("timm:", "torchvision:", "dynopool_convert.training.zoo:")


def is_trusted_source(source: str) -> bool:
    """True for timm/torchvision and dynopool's bundled models; any other ``module:factory``
    source imports and runs code, so loading it needs the user's explicit trust."""
    return source.startswith(TRUSTED_PREFIXES)


def model_label(source: str) -> str:
    """A short file-name-friendly label: ``timm:resnet50`` -> ``resnet50``."""
    return re.sub(r"[^\w.-]+", "_", source.rsplit(":", 1)[-1])


def _torchvision_model(name: str, args: dict[str, Any]) -> nn.Module:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    params = inspect.signature(builder).parameters
    kwargs = {"weights": None}
    if "weights_backbone" in params:
        kwargs["weights_backbone"] = None  # else the builder downloads backbone weights
    kwargs.update(args)
    return builder(**kwargs)


def _import_user_module(name: str) -> ModuleType:
    """``name`` imported; where its top-level package is not found, from the working directory
    too, as ``python -m`` would (a console script's path does not hold it), but never ahead of
    installed packages."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        if err.name != name.split(".")[0] or cwd in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(name)


def _import_file(path: str) -> ModuleType:
    """The Python file at ``path`` imported as a module of its own (once per file: its classes
    stay the same objects), with its folder on ``sys.path`` for its own imports."""
    name = "dynopool_user_" + hashlib.sha1(path.encode()).hexdigest()[:16]  # one module per file
    if name in sys.modules:
        return sys.modules[name]
    folder = str(Path(path).parent)
    if folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _factory_model(source: str, args: dict[str, Any]) -> nn.Module:
    module_name, attr = source.rsplit(":", 1)
    try:
        module = _import_file(module_name) if module_name.endswith(".py") else _import_user_module(module_name)
    except ImportError as err:
        raise UserInputError(f"cannot import {module_name!r} for model source {source!r}: {err} (run from the "
                             f"folder that holds it, or add that folder to PYTHONPATH)") from err
    except Exception as err:  # the user's file itself fails (a syntax error, a failing top-level line)
        msg = " ".join(str(err).split())[:200]
        raise UserInputError(f"importing {module_name!r} for model source {source!r} failed: {type(err).__name__}: {msg}") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserInputError(f"{module_name!r} has no callable {attr!r} (model source {source!r})")
    return factory(**args)


def build_model(source: str, build_args: dict[str, Any] | None = None) -> nn.Module:
    """Build a randomly initialised model from ``source`` (resolved first) and ``build_args``.

    ``build_args`` are keyword arguments of ``timm.create_model``, the torchvision builder, or
    the factory (e.g. ``{"num_classes": 10}``).
    """
    source = resolve_source(source)
    args = dict(build_args or {})
    kind, name = source.split(":", 1) if source.startswith(("timm:", "torchvision:")) else ("factory", source)
    try:
        if kind == "timm":
            import timm

            args.pop("pretrained", None)
            model = timm.create_model(name, pretrained=False, **args)
        elif kind == "torchvision":
            if args.get("weights") is not None or args.get("weights_backbone") is not None:
                raise UserInputError("pretrained weights cannot be downloaded here: build torchvision models with weights=None")
            model = _torchvision_model(name, args)
        else:
            model = _factory_model(source, args)
    except TypeError as err:
        raise UserInputError(f"cannot build {source!r} with arguments {args}: {err}") from err
    if not isinstance(model, nn.Module):
        raise UserInputError(f"model source {source!r} returned {type(model).__name__}, not an nn.Module")
    return model


def default_input_size(source: str, model: nn.Module | None = None) -> tuple[int, int, int]:
    """The model's own reference ``(C, H, W)``: its ``image_size`` attribute (torchvision ViTs),
    timm's ``pretrained_cfg``, torchvision's weights transforms (crop size), else
    ``(3, 224, 224)``. Nothing is downloaded."""
    source = resolve_source(source)
    image_size = getattr(model, "image_size", None)  # torchvision ViTs: the size they are built for
    if isinstance(image_size, int) and image_size > 0:
        return 3, image_size, image_size
    if model is not None and isinstance(getattr(model, "pretrained_cfg", None), dict):
        size = model.pretrained_cfg.get("input_size")
        if size and len(size) == 3:
            return tuple(int(v) for v in size)  # type: ignore[return-value]
    if source.startswith("timm:"):
        import timm

        cfg = timm.models.get_pretrained_cfg(source[5:])
        if cfg is not None and cfg.input_size:
            return tuple(int(v) for v in cfg.input_size)  # type: ignore[return-value]
    if source.startswith("torchvision:"):
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(source.split(":", 1)[1])
            crop = list(weights)[0].transforms().crop_size
            return 3, int(crop[0]), int(crop[-1])
        except (ValueError, AttributeError, IndexError, TypeError):
            pass  # no weights enum or no crop size: fall back to the default
    return 3, 224, 224


def parse_input_size(text: str, channels: int = 3) -> tuple[int, int, int]:
    """``"224"``, ``"224x160"`` (height x width) -> ``(channels, H, W)``; ``"1,28,28"`` gives its own
    channels (``sizes.parse_size``).

    >>> parse_input_size("64"), parse_input_size("64x48"), parse_input_size("1,28,28")
    ((3, 64, 64), (3, 64, 48), (1, 28, 28))
    """
    return complete_size(parse_size(text), (channels, 1, 1))


def parse_build_args(items: list[str] | None) -> dict[str, Any]:
    """``["num_classes=10", "dynamic_img_size=true"]`` -> ``{"num_classes": 10, "dynamic_img_size": True}``.

    Values are read as YAML scalars (numbers, booleans, null, strings, ``[lists]``), and
    ``(64, 96)`` as a tuple of Python literals.
    """
    import ast

    import yaml

    args: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserInputError(f"build argument must be KEY=VALUE with a Python identifier as KEY, got {item!r}")
        try:
            args[key] = yaml.safe_load(value) if value.strip() else ""
            if isinstance(args[key], str) and value.strip().startswith("(") and value.strip().endswith(")"):
                args[key] = ast.literal_eval(value.strip())
        except (yaml.YAMLError, ValueError, SyntaxError) as err:
            raise UserInputError(f"cannot read the value of build argument {item!r}: {' '.join(str(err).split())}") from err
    return args
