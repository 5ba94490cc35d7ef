"""Validation of a converted graph (DESIGN.md §2, "Validation").

Runs the converted model at the reference size and with each tied group's stride moved so that
its output size changes (one step smaller on both axes; one step larger along the height only,
which also catches square-map assumptions). All groups are moved together first; only when that
fails is each group moved on its own, to find which ones break. A group that breaks the forward, changes the output's non-spatial
shape, or gets a missing or non-finite stride gradient is reported with the reason; ``convert``
reverts it and validates again.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten

from .dynopool import DynOPool, dynopool_output_size
from .errors import one_line

__all__ = ["quiet", "OutputSpec", "output_spec", "GroupFailure", "ValidationReport", "validate", "GroupProbe"]


@dataclass(frozen=True)
class OutputSpec:
    """Shapes of the model's tensor outputs; spatial dims of 4-D outputs may change."""

    shapes: tuple[tuple[int, ...], ...]

    def mismatch(self, other: "OutputSpec") -> str:
        """Empty when ``other`` is compatible, else why not."""
        if len(other.shapes) != len(self.shapes):
            return f"the model returns {len(other.shapes)} tensors instead of {len(self.shapes)}"
        for ref, got in zip(self.shapes, other.shapes):
            fixed = ref[:2] if len(ref) == 4 else ref
            if len(ref) != len(got) or (got[:2] if len(got) == 4 else got) != fixed:
                return f"output shape {list(got)} does not match the original's {list(ref)}"
        return ""


def _tensors(out: Any) -> list[Tensor]:
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, Tensor)]


def output_spec(out: Any) -> OutputSpec:
    """The ``OutputSpec`` of a model output (tensor, tuple, dict, namedtuple...)."""
    return OutputSpec(tuple(tuple(t.shape) for t in _tensors(out)))


@dataclass
class GroupFailure:
    group: int
    reason: str
    kind: str = "forward"  # forward (a moved stride breaks it) | gradient | unreached


@dataclass
class ValidationReport:
    """What validation found: failing groups, and per-site sizes at the reference input."""

    failures: list[GroupFailure] = field(default_factory=list)
    reference_error: str = ""
    sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=dict)  # path -> (in, out)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.reference_error


def _groups(gm: nn.Module) -> dict[int, tuple[nn.Parameter, list[tuple[str, DynOPool]]]]:
    found: dict[int, tuple[nn.Parameter, list]] = {}
    for name, m in gm.named_modules():
        if isinstance(m, DynOPool):
            found.setdefault(m.group, (m.stride, []))[1].append((name, m))
    return found


def quiet():
    """Silence fx's GraphModule, which prints the generated code's traceback to stderr before
    re-raising: a failing forward is an expected finding here, reported in the plan."""
    return contextlib.redirect_stderr(io.StringIO())


def _run(gm: nn.Module, x: Tensor, spec: OutputSpec) -> str:
    """Empty string when a forward succeeds with a compatible, finite output, else the reason."""
    try:
        with torch.no_grad(), quiet():
            out = gm(x)
    except Exception as err:  # any forward failure is a validation finding, reported verbatim
        return f"{type(err).__name__}: {one_line(err, 160)}"
    got = output_spec(out)
    problem = spec.mismatch(got)
    if problem:
        return problem
    if not all(torch.isfinite(t).all() for t in _tensors(out) if t.is_floating_point()):
        return "the output is not finite"
    return ""


def _moves(size_in: tuple[int, int], stride: tuple[float, float], bounds: tuple[float, float],
           multiple: tuple[int, int] = (1, 1), base: tuple[float, float] = (1.0, 1.0)) -> list[tuple[str, tuple[float, float]]]:
    """Strides that change the output size by one step (one pixel, or one ``multiple``):
    smaller on both axes, larger along the height only (one move down, one up, and a
    non-square map to catch square-size assumptions)."""
    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]

    def target(size: int, s: float, delta: int, m: int, b: float) -> float | None:
        out = dynopool_output_size(size, s / b, m) + delta * m
        if out < 1:
            return None
        new = size / out * b
        return new if lo <= new <= hi else None

    moves = []
    (h, w), (sh, sw) = size_in, stride
    for label, dh, dw in (("smaller", -1, -1), ("taller", 1, 0)):
        nh = target(h, sh, dh, multiple[0], base[0]) if dh else sh
        nw = target(w, sw, dw, multiple[1], base[1]) if dw else sw
        if nh is not None and nw is not None:
            moves.append((label, (nh, nw)))
    return moves


_LABELS = ("smaller", "taller")


def _moved_run(gm: nn.Module, example: Tensor, spec: OutputSpec, groups: dict, moves: dict, label: str, which: list[int]) -> str:
    """Run with the groups in ``which`` moved by ``label`` (those that can move); restore after."""
    saved = {}
    with torch.no_grad():
        for gid in which:
            if label in moves[gid]:
                param = groups[gid][0]
                saved[gid] = param.detach().clone()
                param.copy_(torch.tensor(moves[gid][label], device=param.device))
    if not saved:
        return ""
    try:
        return _run(gm, example, spec)
    finally:
        with torch.no_grad():
            for gid, value in saved.items():
                groups[gid][0].copy_(value)


def _size_hooks(gm: nn.Module, sizes: dict) -> list:
    handles = []
    for name, m in gm.named_modules():
        if isinstance(m, DynOPool):
            def hook(mod, args, out, name=name):
                sizes[name] = (tuple(args[0].shape[-2:]), tuple(out.shape[-2:]))
            handles.append(m.register_forward_hook(hook))
    return handles


class GroupProbe:
    """Moves one group at a time on ``gm`` (the others at their strides) and reports whether
    the forward survives; the ``watch`` pools (pins) record whether a move changed their input
    away from their output size."""

    def __init__(self, gm: fx.GraphModule, example: Tensor, spec: OutputSpec, watch: dict[str, nn.AdaptiveAvgPool2d]) -> None:
        self.gm, self.example, self.spec = gm, example, spec
        self.sizes: dict[str, tuple] = {}
        handles = _size_hooks(gm, self.sizes)
        gm.eval()
        self.reference_error = _run(gm, example, spec)
        for h in handles:
            h.remove()
        self.groups = {g: v for g, v in _groups(gm).items() if v[1][0][0] in self.sizes}
        self._watch = watch

    def problem(self, gid: int) -> tuple[str, set[str]]:
        """Why moving group ``gid`` breaks the forward ("" if it does not), and the watched
        modules whose input size the moves changed."""
        if gid not in self.groups:
            return "the site is not reached by the forward pass", set()
        param, members = self.groups[gid]
        moves = {gid: dict(_moves(self.sizes[members[0][0]][0], tuple(param.detach().tolist()), members[0][1].r_bounds,
                                  members[0][1].multiple, members[0][1].base))}
        seen: dict[str, set] = {name: set() for name in self._watch}
        handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].add(tuple(args[0].shape[-2:])))
                   for name, m in self._watch.items()]
        try:
            for label in _LABELS:
                problem = _moved_run(self.gm, self.example, self.spec, {gid: (param, members)}, moves, label, [gid])
                if problem:
                    stride = moves[gid][label]
                    return f"{label} output (stride {stride[0]:.3g}x{stride[1]:.3g}) breaks the forward: {problem}", set()
        finally:
            for h in handles:
                h.remove()
        return "", {name for name, shapes in seen.items() if shapes - {tuple(self._watch[name].output_size)}}

    def multiples(self, gid: int) -> list[tuple[int, int]]:
        """Candidate multiples for group ``gid``: the divisors of its reference output size (both
        axes) that leave at least two steps and refine its present multiple, smallest first."""
        pool = self.groups[gid][1][0][1]
        out_h, out_w = self.sizes[self.groups[gid][1][0][0]][1]
        m_h, m_w = pool.multiple
        g_h, g_w = out_h // m_h, out_w // m_w  # in steps of the present multiple
        g = math.gcd(g_h, g_w)
        return [(m_h * d, m_w * d) for d in range(2, g // 2 + 1) if g % d == 0]

    def problem_with_multiple(self, gid: int, multiple: tuple[int, int]) -> tuple[str, set[str]]:
        """``problem`` with the group's output sizes rounded to ``multiple`` (restored after)."""
        members = self.groups[gid][1]
        saved = [m.multiple for _, m in members]
        for _, m in members:
            m.multiple = multiple
        try:
            return self.problem(gid)
        finally:
            for (_, m), value in zip(members, saved):
                m.multiple = value


def validate(gm: fx.GraphModule, example: Tensor, spec: OutputSpec, reference_only: bool = False) -> ValidationReport:
    """Check ``gm`` (a converted model) at the reference input ``example`` and moved strides
    (only at the reference input with ``reference_only``)."""
    report = ValidationReport()
    was_training = gm.training
    gm.eval()
    try:
        handles = _size_hooks(gm, report.sizes)
        report.reference_error = _run(gm, example, spec)
        for h in handles:
            h.remove()
        if report.reference_error or reference_only:
            return report
        groups = _groups(gm)
        for gid, (_, members) in groups.items():
            if members[0][0] not in report.sizes:
                report.failures.append(GroupFailure(gid, "the site is not reached by the forward pass", "unreached"))
        reached = {g: v for g, v in groups.items() if v[1][0][0] in report.sizes}
        moves = {
            gid: dict(_moves(report.sizes[members[0][0]][0], tuple(param.detach().tolist()), members[0][1].r_bounds,
                             members[0][1].multiple, members[0][1].base))
            for gid, (param, members) in reached.items()
        }
        # every group moved at once first (cheap); one group at a time only when that fails
        if any(_moved_run(gm, example, spec, reached, moves, label, list(reached)) for label in _LABELS):
            for gid in reached:
                for label in _LABELS:
                    problem = _moved_run(gm, example, spec, reached, moves, label, [gid])
                    if problem:
                        stride = moves[gid][label]
                        report.failures.append(GroupFailure(
                            gid, f"{label} output (stride {stride[0]:.3g}x{stride[1]:.3g}) breaks the forward: {problem}"))
                        break
        failed = {f.group for f in report.failures}
        report.failures += _gradient_failures(gm, example, {g: p for g, (p, _) in groups.items() if g not in failed})
    finally:
        gm.train(was_training)
    return report


def _gradient_failures(gm: nn.Module, example: Tensor, params: dict[int, nn.Parameter]) -> list[GroupFailure]:
    """Groups whose stride gets no gradient or a non-finite one from a random projection of the output."""
    if not params:
        return []
    strides = {id(p) for p in params.values()}
    frozen = [p for p in gm.parameters() if p.requires_grad and id(p) not in strides]
    for p in frozen:  # only the stride gradients are needed
        p.requires_grad_(False)
    for p in params.values():
        p.grad = None
    try:
        with quiet():
            outs = [t for t in _tensors(gm(example)) if t.is_floating_point()]
        gen = torch.Generator().manual_seed(0)
        loss = sum((t * torch.randn(t.shape, generator=gen).to(t.device, t.dtype)).sum() for t in outs)
        loss.backward()
    except Exception as err:  # the backward itself failing is a finding for every group
        return [GroupFailure(g, f"backward fails: {type(err).__name__}: {one_line(err, 160)}", "gradient") for g in params]
    finally:
        for p in frozen:
            p.requires_grad_(True)
    failures = []
    for gid, p in params.items():
        if p.grad is None:
            failures.append(GroupFailure(gid, "no gradient reaches the stride (the site does not affect the output)", "gradient"))
        elif not torch.isfinite(p.grad).all():
            failures.append(GroupFailure(gid, f"the stride gradient is not finite ({p.grad.tolist()})", "gradient"))
        p.grad = None
    gm.zero_grad(set_to_none=True)
    return failures
