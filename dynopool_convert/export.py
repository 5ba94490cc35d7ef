"""Export a frozen model to ONNX, TorchScript, ``torch.export`` (.pt2) or safetensors, and check it.

``export(model, fmt, path, input_size)`` freezes the converted ``model`` at its reference input
size, writes ``path`` and returns an ``ExportResult`` whose ``max_abs_diff`` is the largest
difference between the written file, loaded back by its own runtime, and ``model`` itself
(not the frozen copy) on random inputs at that size, next to the distance of the file and of
the model itself from the model run in float64 (``ExportResult.passes`` reads both). What each format keeps: docs/EXPORT.md.

- ``onnx``: ``torch.onnx.export(dynamo=True)`` at opset ``ONNX_OPSET``, one file, standard ops
  only (the resizing sites are ``Resize`` + ``MaxPool``/``AveragePool``); checked in onnxruntime.
- ``torchscript``: ``torch.jit.trace``; checked with ``torch.jit.load``.
- ``pt2``: ``torch.export.export`` + ``torch.export.save``; checked with ``torch.export.load``.
- ``safetensors``: the frozen model's state dict; checked by loading it into a frozen copy whose
  tensors were overwritten.

The batch dimension stays dynamic in the three graph formats (checked at another batch size
than the one exported with), unless ``batch`` fixes it; the spatial size is fixed.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .convert import check_input_size
from .errors import UserInputError
from .flops import _traceable_unpool
from .files import atomic_write, check_output_path
from .freeze import freeze, frozen_parts, reference_input_size

__all__ = ["FORMATS", "ONNX_OPSET", "ExportResult", "check_format", "export", "export_frozen", "load_exported"]

FORMATS = ("onnx", "torchscript", "pt2", "safetensors")
#: ONNX opset of the exported files (Resize with half-pixel coordinates needs >= 11)
ONNX_OPSET = 18


@dataclass
class ExportResult:
    """A written export and how far its output is from the converted PyTorch model."""

    path: Path
    format: str
    input_size: tuple[int, int, int]
    max_abs_diff: float
    frozen_max_abs_diff: float
    output_max: float  # largest |output| of the PyTorch model on the same inputs, for a relative reading
    opset: int | None = None
    #: the file's and the PyTorch model's own max abs difference from the model run in float64
    #: (None: the model does not run in float64); deep networks differ from themselves by more
    #: than 1e-5 in float32, and a float16 model by far more (``float32_max_abs_diff`` is the
    #: model's own, in its ``precision``)
    float64_max_abs_diff: float | None = None
    float32_max_abs_diff: float | None = None
    note: str | None = None  # how the file was written, where not the usual way (ONNX: the TorchScript exporter)
    precision: str = "float32"  # the model's (its parameters' floating dtype)
    batch: int | None = None  # the fixed batch size, None: dynamic
    #: with a dynamic batch: the file's difference at the batch size it was exported with (the
    #: check's is at another); far smaller there, the exporter fixed something that the model
    #: computes from the batch size
    example_max_abs_diff: float | None = None
    example_batch: int = 2

    def tolerance(self, atol: float, rtol: float) -> float:
        return atol + rtol * self.output_max

    def passes(self, atol: float, rtol: float) -> bool:
        """Within ``atol + rtol x max|output|`` of the PyTorch model, or, where rounding in the
        model's precision alone moves the output by more, no farther from the float64 result than
        that plus twice the PyTorch model's own distance from it (the file is as exact as PyTorch is)."""
        tolerance = self.tolerance(atol, rtol)
        if self.max_abs_diff <= tolerance:
            return True
        if self.float64_max_abs_diff is None or self.float32_max_abs_diff is None:
            return False
        return self.float64_max_abs_diff <= tolerance + 2 * self.float32_max_abs_diff


def _example(input_size: tuple[int, int, int], batch: int, seed: int, like: nn.Module) -> Tensor:
    param = next(like.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines and tracer warnings stay off the user's terminal."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _batch_dynamic() -> tuple[dict[int, object]]:
    return ({0: torch.export.Dim.AUTO},)


def output_names(out: object) -> list[str]:
    """ONNX output names for a model's output: ``output`` for one tensor, a dict's keys for a
    dict of tensors (torchvision's segmentation models: ``out``, ``aux``), else ``output_<i>``
    in the order of ``torch.utils._pytree``'s leaves (the order the exporters use)."""
    leaves = tree_leaves(out)
    if isinstance(out, Tensor):
        return ["output"]
    if isinstance(out, dict) and len(out) == len(leaves) and all(isinstance(k, str) for k in out):
        return list(out)
    return [f"output_{i}" for i in range(len(leaves))]


def _write_onnx(frozen: nn.Module, example: Tensor, tmp: Path, dynamic: bool = True) -> str | None:
    """The dynamo exporter (torch.export + onnxscript); where it cannot translate an op
    (onnxscript's attention takes 4-d queries only: Twins), the TorchScript-based exporter, said
    in the returned note. Both write standard ops at ``ONNX_OPSET``."""
    names = output_names(frozen(example))
    try:
        torch.onnx.export(frozen, (example,), str(tmp), dynamo=True, opset_version=ONNX_OPSET, external_data=False,
                          dynamic_shapes=_batch_dynamic() if dynamic else None, input_names=["input"], output_names=names,
                          verbose=False)
        return None
    except Exception as err:  # noqa: BLE001 - any exporter failure: try the other exporter, else report this one
        first = err
    try:
        axes = {name: {0: "batch"} for name in ["input", *names]} if dynamic else None
        with _native_stdout_silenced(), _traceable_unpool():  # on failure it dumps the whole TorchScript graph there
            torch.onnx.export(frozen, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["input"], output_names=names, dynamic_axes=axes)
    except Exception:  # noqa: BLE001 - the dynamo exporter's message says more
        raise first from None
    return f"written by the TorchScript-based ONNX exporter (the dynamo exporter failed: {_root_cause(first)})"


@contextlib.contextmanager
def _native_stdout_silenced():
    """File descriptor 1 sent to /dev/null: C++ logging (``torch._C._jit_onnx_log``) writes
    there directly, past ``sys.stdout``."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _root_cause(err: BaseException) -> str:
    """The innermost error of a chain, in one line (the dynamo exporter wraps the real reason)."""
    seen = set()
    while (err.__cause__ or err.__context__) is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {_one_line(err, 150)}"


def _write_torchscript(frozen: nn.Module, example: Tensor, tmp: Path, dynamic: bool = True) -> None:
    with _traceable_unpool():  # torch's max-unpool size check fails under jit tracing
        traced = torch.jit.trace(frozen, example, strict=False)  # strict=False: dict and list outputs
    traced.save(str(tmp))


def _write_pt2(frozen: nn.Module, example: Tensor, tmp: Path, dynamic: bool = True) -> None:
    buffer = io.BytesIO()  # through a buffer: torch.export.save warns about a file not named *.pt2
    shapes = _batch_dynamic() if dynamic else None
    torch.export.save(torch.export.export(frozen, (example,), dynamic_shapes=shapes), buffer)
    tmp.write_bytes(buffer.getvalue())


def _write_safetensors(frozen: nn.Module, example: Tensor, tmp: Path, dynamic: bool = True) -> None:
    from safetensors.torch import save_model

    save_model(frozen, str(tmp))


#: each writes the file (its batch dynamic, or the example's) and may return a note on how (None: the usual way)
_WRITERS: dict[str, Callable[[nn.Module, Tensor, Path, bool], str | None]] = {
    "onnx": _write_onnx, "torchscript": _write_torchscript, "pt2": _write_pt2, "safetensors": _write_safetensors,
}


def load_exported(fmt: str, path: str | Path, frozen: nn.Module | None = None) -> Callable[[Tensor], Tensor]:
    """A function running the exported file in its own runtime (``safetensors`` needs ``frozen``,
    the architecture its weights are loaded into: a copy with every tensor overwritten first)."""
    path = str(path)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(x: Tensor) -> Tensor | list[Tensor]:
            outs = [torch.from_numpy(o) for o in session.run(None, {name: x.detach().cpu().numpy()})]
            return outs[0] if len(outs) == 1 else outs  # several: in the order of the model's pytree leaves

        return run
    if fmt == "torchscript":
        return torch.jit.load(path, map_location="cpu")
    if fmt == "pt2":
        return torch.export.load(path).module()
    if fmt == "safetensors":
        from safetensors.torch import load_model

        if frozen is None:
            raise ValueError("safetensors holds weights only: pass the frozen model to load them into")
        blank = copy.deepcopy(frozen)
        with torch.no_grad():  # what the file must bring back: the state dict (not the computed buffers)
            for t in blank.state_dict().values():
                t.fill_(float("nan") if t.is_floating_point() else 0)
        load_model(blank, path)
        return blank
    raise ValueError(f"unknown export format {fmt!r}")


def _outputs(run: Callable[[Tensor], Tensor], inputs: list[Tensor]) -> list[Tensor]:
    """Each input's output as one float64 vector: every tensor of a dict, tuple or list output,
    flattened in pytree order and concatenated."""
    with torch.no_grad():
        return [torch.cat([t.double().flatten() for t in tree_leaves(run(x))]) for x in inputs]


def _distance(got: list[Tensor], want: list[Tensor]) -> float:
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    return diff if diff == diff else float("inf")  # NaN: as far as it gets


def _max_diff(run: Callable[[Tensor], Tensor], reference: Callable[[Tensor], Tensor], inputs: list[Tensor]) -> tuple[float, float]:
    """Max abs difference of ``run`` from ``reference`` over ``inputs``, and max |reference output|."""
    want = _outputs(reference, inputs)
    return _distance(_outputs(run, inputs), want), max(float(w.abs().max()) for w in want)


def _run_loaded(loaded: Callable[[Tensor], Tensor], inputs: list[Tensor], example: Tensor | None, fmt: str,
                path: Path) -> list[Tensor]:
    """The written file's outputs on ``inputs``, or UserInputError where it does not run on them
    (saying whether it runs on ``example``, the input it was exported with at another batch size)."""
    try:
        return _outputs(loaded, inputs)
    except Exception as err:  # noqa: BLE001 - each runtime raises its own types
        why = _one_line(err, 150)
    if example is not None:
        try:
            _outputs(loaded, [example])
        except Exception:  # noqa: BLE001 - fails at every batch size: said below
            pass
        else:
            raise UserInputError(
                f"the written {fmt} file ({path}) runs at the batch size it was exported with ({example.shape[0]}) but "
                f"not at {inputs[0].shape[0]}: {why}; the exporter fixed a value the model computes from the batch "
                f"size (an int() of a size, say): export with --batch N for a graph of batch N")
    raise UserInputError(f"the written {fmt} file ({path}) does not run in its runtime: {why}")


def _float64_copy(model: nn.Module, x: Tensor) -> nn.Module | None:
    """``model`` in float64 (a copy), or None where it does not run so or is not in float32,
    float16 or bfloat16."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    try:
        copy64 = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            if any(t.dtype != torch.float64 for t in tree_leaves(copy64(x.double()))):  # it casts down somewhere
                return None
    except Exception:  # noqa: BLE001 - a model without float64 support just gets no such reading
        return None
    return copy64


def _culprit(model: nn.Module, fmt: str, input_size: tuple[int, int, int]) -> str | None:
    """The first frozen site that fails to export on its own, if one does."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, (in_size, static) in frozen_parts(model, input_size).items():
            x = torch.randn(2, 1, *in_size)  # one channel: a resize does not depend on the count
            try:
                with _quiet(), torch.no_grad():
                    _WRITERS[fmt](static.eval(), x, Path(tmp) / "site")
            except Exception as err:  # noqa: BLE001 - any exporter failure names this site
                return f"site {name!r} ({type(static).__name__}) cannot be exported: {_one_line(err)}"
    return None


def _one_line(err: BaseException, limit: int = 200) -> str:
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split())[:limit]  # without terminal colours


def check_format(fmt: str) -> None:
    """UserInputError unless ``fmt`` is a format and the packages it needs are installed."""
    if fmt not in FORMATS:
        raise UserInputError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
        if missing:
            raise UserInputError(f"ONNX export needs {', '.join(missing)}: pip install 'dynopool[export]'")


def export_frozen(frozen: nn.Module, fmt: str, path: str | Path, example: Tensor, dynamic: bool = True) -> Path:
    """Write the already frozen model ``frozen`` in format ``fmt`` to ``path`` (atomically), its
    batch dynamic or ``example``'s."""
    return _export_frozen(frozen, fmt, path, example, dynamic)[0]


def _export_frozen(frozen: nn.Module, fmt: str, path: str | Path, example: Tensor, dynamic: bool = True) -> tuple[Path, str | None]:
    check_format(fmt)
    path = check_output_path(path, f"{fmt} export")
    notes: list[str | None] = []
    with _quiet(), torch.no_grad():
        atomic_write(path, lambda tmp: notes.append(_WRITERS[fmt](frozen, example, Path(tmp), dynamic)))
    return path, notes[0] if notes else None


def export(model: nn.Module, fmt: str, path: str | Path, input_size: Sequence[int] | None = None,
           trials: int = 2, seed: int = 0, batch: int | None = None) -> ExportResult:
    """Freeze ``model`` at ``input_size`` (default: its reference size), write ``path`` in format
    ``fmt``, load it back and compare with ``model`` on ``trials`` random batches: exported with
    a batch of 2 and checked with batches of 3 (the batch is dynamic), or of ``batch`` (fixed).

    Raises ``UserInputError`` naming the site (or the exporter's message) when the format cannot
    hold the model; the file is then not written.
    """
    check_format(fmt)
    size = check_input_size(input_size) if input_size is not None else reference_input_size(model)
    if batch is not None and batch < 1:
        raise UserInputError(f"the batch size must be at least 1, got {batch}")
    frozen = freeze(model, size)
    example = _example(size, batch or 2, seed, frozen)
    try:
        path, note = _export_frozen(frozen, fmt, path, example, dynamic=batch is None)
    except UserInputError:
        raise
    except Exception as err:  # noqa: BLE001 - the exporters raise many types
        site = _culprit(model, fmt, size)
        # the dynamo ONNX exporter wraps the reason ("No ONNX function found for aten...") in
        # a generic ConversionError
        why = site or (_root_cause(err) if fmt == "onnx" else f"{type(err).__name__}: {_one_line(err)}")
        others = ", ".join(f for f in FORMATS if f != fmt)
        raise UserInputError(f"cannot export to {fmt}: {why} (other formats: {others})") from err
    # a dynamic batch is checked at another batch size than the example's
    inputs = [_example(size, batch or 3, seed + 1 + i, frozen) for i in range(trials)]
    was_training = model.training
    model.eval()
    diff64 = own64 = at_example = None
    try:
        with _quiet():
            loaded = load_exported(fmt, path, frozen)
            got = _run_loaded(loaded, inputs, example if batch is None else None, fmt, path)
            want = _outputs(model, inputs)
            if batch is None:
                at_example = _distance(_outputs(loaded, [example]), _outputs(model, [example]))
            diff, scale = _distance(got, want), max(float(w.abs().max()) for w in want)
            frozen_diff = _distance(_outputs(frozen, inputs), want)
            exact = _float64_copy(model, inputs[0])
            if exact is not None:
                want64 = _outputs(lambda x: exact(x.double()), inputs)
                diff64, own64 = _distance(got, want64), _distance(want, want64)
    finally:
        model.train(was_training)
    return ExportResult(path, fmt, size, diff, frozen_diff, scale, ONNX_OPSET if fmt == "onnx" else None,
                        diff64, own64, note, str(inputs[0].dtype).removeprefix("torch."), batch, at_example,
                        example.shape[0])
