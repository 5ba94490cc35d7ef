"""Validation of a converted graph (DESIGN.md §2, "Validation").

Runs the converted model at the reference size, then with its strides moved the way training
moves them (``moves``: each group on each axis by the larger of 30% of its stride and one
output step, up and down; then a few seeded random moves of all groups at once within
``[0.7, 1.4]`` of their strides, forward and backward). A group that breaks the forward,
changes the output's non-spatial shape, or gets a missing or non-finite stride gradient is
reported with the reason; ``convert`` rounds, pins or reverts it and validates again.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten

from .dynopool import DynOPool
from .errors import one_line
from .group_ids import StrideGroup, stride_groups
from .broadcast_watch import ElementwiseShapes, broadcast_problem
from .moves import CAP_SHRINK, JOINT_MOVES, JOINT_SEED, axis_moves, clamp_stride, joint_moves

__all__ = ["quiet", "OutputSpec", "output_spec", "GroupFailure", "ValidationReport", "validate", "GroupProbe",
           "joint_moves_problem"]


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
    kind: str = "forward"  # forward (its own move breaks it) | joint (a joint move does) | gradient | unreached


@dataclass
class ValidationReport:
    """What validation found: failing groups, and per-site sizes at the reference input."""

    failures: list[GroupFailure] = field(default_factory=list)
    reference_error: str = ""
    sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=dict)  # path -> (in, out)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.reference_error


def _groups(gm: nn.Module) -> dict[int, StrideGroup]:
    """The converted model's groups by plan id (a DynOPool built by hand: by its position)."""
    return {g.id if g.id is not None else i: g for i, g in enumerate(stride_groups(gm))}


@contextlib.contextmanager
def quiet():
    """Where a trial forward runs: fx's GraphModule silenced (it prints the generated code's
    traceback to stderr before re-raising: a failing forward is an expected finding here,
    reported in the plan), and attention on PyTorch's math kernel. The fused CPU kernel does not
    check that keys and values have the same length: where a move gives them different maps
    (MobileNetV4's attention, whose key and value each have a strided conv), it reads past its
    buffers and the process dies (double free, segfault) instead of raising."""
    with contextlib.redirect_stderr(io.StringIO()), sdpa_kernel([SDPBackend.MATH]):
        yield


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


def _group_moves(groups: dict[int, StrideGroup], sizes: dict, gid: int) -> list[tuple[str, tuple[float, float]]]:
    pool = groups[gid].first
    return axis_moves(sizes[groups[gid].path][0], pool.stride_value, pool.r_bounds, pool.multiple, pool.base, pool.square)


@contextlib.contextmanager
def _strides_set(groups: dict[int, StrideGroup], strides: dict[int, tuple[float, float]]):
    """The groups' stride parameters set to ``strides`` (group -> stride), restored after."""
    saved = {}
    with torch.no_grad():
        for gid, stride in strides.items():
            param = groups[gid].param
            saved[gid] = param.detach().clone()
            param.copy_(torch.tensor(stride, dtype=param.dtype, device=param.device))
    try:
        yield
    finally:
        with torch.no_grad():
            for gid, value in saved.items():
                groups[gid].param.copy_(value)


def _moved_problem(gm: nn.Module, example: Tensor, spec: OutputSpec, groups: dict, sizes: dict, gid: int) -> str:
    """Why one of group ``gid``'s per-axis moves breaks the forward ("" if none does)."""
    for label, stride in _group_moves(groups, sizes, gid):
        with _strides_set(groups, {gid: stride}):
            problem = _run(gm, example, spec)
        if problem:
            return f"{label} (stride {stride[0]:.3g}x{stride[1]:.3g}) breaks the forward: {problem}"
    return ""


def _joint_failures(gm: nn.Module, example: Tensor, spec: OutputSpec, groups: dict, n: int = JOINT_MOVES) -> list[GroupFailure]:
    """Run ``n`` random joint moves forward and backward. A forward failure is laid on the group
    whose move, added to those of the groups before it, first breaks the forward."""
    params = {gid: g.param for gid, g in groups.items()}
    for k, move in enumerate(joint_moves(*_strides_and_bounds(groups), n)):
        with _strides_set(groups, move):
            problem, failures = _forward_backward(gm, example, spec, params)
        for f in failures:
            f.reason = f"at random joint move {k + 1}: {f.reason}"
        if failures:
            return failures
        if not problem:
            continue
        moved: dict[int, tuple[float, float]] = {}
        for gid in sorted(groups):
            moved[gid] = move[gid]
            with _strides_set(groups, moved):
                culprit = _run(gm, example, spec)
            if culprit:
                others = ", ".join(str(g) for g in moved if g != gid) or "no other group"
                stride = move[gid]
                return [GroupFailure(gid, f"random joint move {k + 1} (stride {stride[0]:.3g}x{stride[1]:.3g}, with "
                                          f"{others} moved) breaks the forward: {culprit}", "joint")]
        return [GroupFailure(min(groups), f"random joint move {k + 1} breaks the forward: {problem}", "joint")]
    return []


def _strides_and_bounds(groups: dict[int, StrideGroup]) -> tuple[dict, dict]:
    strides = {gid: g.first.stride_value for gid, g in groups.items()}
    bounds = {gid: g.first.r_bounds for gid, g in groups.items()}
    return strides, bounds


def joint_moves_problem(gm: nn.Module, example: Tensor, n: int, seed: int, factors: tuple[float, float]) -> str:
    """Why a random joint move (``n`` of them, each group and axis times a factor in
    ``factors``) breaks ``gm``'s forward or backward at ``example``; "" when none does.
    The property the zoo sweep checks after conversion."""
    was_training = gm.training
    gm.eval()
    try:
        return _joint_problem(gm, example, n, seed, factors)
    finally:
        gm.train(was_training)


def _joint_problem(gm: nn.Module, example: Tensor, n: int, seed: int, factors: tuple[float, float]) -> str:
    spec = output_spec(_eval_forward(gm, example))
    groups = _groups(gm)
    params = {gid: g.param for gid, g in groups.items()}
    for k, move in enumerate(joint_moves(*_strides_and_bounds(groups), n, seed, factors)):
        with _strides_set(groups, move):
            problem, failures = _forward_backward(gm, example, spec, params)
        problem = problem or "; ".join(f"group {f.group}: {f.reason}" for f in failures)
        if problem:
            return f"joint move {k + 1}: {problem}"
    return ""


def _eval_forward(gm: nn.Module, example: Tensor) -> Any:
    with torch.no_grad(), quiet():
        return gm(example)


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
        self.groups = {gid: g for gid, g in _groups(gm).items() if g.path in self.sizes}
        self._watch = watch

    def problem(self, gid: int) -> tuple[str, set[str]]:
        """Why moving group ``gid`` breaks the forward ("" if it does not), and the watched
        modules whose input size the moves changed."""
        if gid not in self.groups:
            return "the site is not reached by the forward pass", set()
        seen: dict[str, set] = {name: set() for name in self._watch}
        handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].add(tuple(args[0].shape[-2:])))
                   for name, m in self._watch.items()]
        try:
            problem = _moved_problem(self.gm, self.example, self.spec, self.groups, self.sizes, gid)
        finally:
            for h in handles:
                h.remove()
        if problem:
            return problem, set()
        return "", {name for name, shapes in seen.items() if shapes - {tuple(self._watch[name].output_size)}}

    def shrink_problem(self, gid: int, depth: float = CAP_SHRINK) -> str:
        """Why group ``gid``'s smaller outputs break the forward, or broadcast operands that were
        equal at the reference (``broadcast_watch.py``): its per-axis shrinking moves, then its
        stride times ``depth`` on both axes and on each alone (a budget fit or training moves
        further than validation's steps); "" if none does. The check a cap must pass."""
        group = self.groups[gid]
        pool = group.first
        moves = [stride for label, stride in _group_moves(self.groups, self.sizes, gid) if label.startswith("smaller")]
        deep = tuple(clamp_stride(s * depth, pool.r_bounds) for s in pool.stride_value)
        # both axes, then each alone (a token grid rebuilt as a square of side int(sqrt(n)) fits
        # one axis's one-step moves by chance: 6 x 8 tokens read as 6 rows, 4 x 8 as 5)
        moves += [deep, (deep[0], pool.stride_value[1]), (pool.stride_value[0], deep[1])]
        reference = ElementwiseShapes()
        with reference:
            _run(self.gm, self.example, self.spec)
        for stride in moves:
            watch = ElementwiseShapes()
            with _strides_set(self.groups, {gid: stride}), watch:
                problem = _run(self.gm, self.example, self.spec)
            problem = problem or broadcast_problem(reference.calls, watch.calls)
            if problem:
                return f"smaller output (stride {stride[0]:.3g}x{stride[1]:.3g}): {problem}"
        return ""

    def joint_problem(self, gid: int, n: int, moving: set[int]) -> str:
        """Why one of ``n`` random joint moves of group ``gid`` and the ``moving`` groups (the
        others where they are) breaks the forward where the same move without group ``gid``'s does
        not ("" if none does): the moves group ``gid`` is to blame for."""
        groups = {g: v for g, v in self.groups.items() if g == gid or g in moving}
        for k, move in enumerate(joint_moves(*_strides_and_bounds(groups), n, seed=JOINT_SEED + 1)):
            with _strides_set(self.groups, move):
                problem = _run(self.gm, self.example, self.spec)
            if not problem:
                continue
            with _strides_set(self.groups, {g: s for g, s in move.items() if g != gid}):
                if not _run(self.gm, self.example, self.spec):
                    stride = move[gid]
                    return f"random joint move {k + 1} (stride {stride[0]:.3g}x{stride[1]:.3g}) breaks the forward: {problem}"
        return ""

    def multiples(self, gid: int) -> list[tuple[int, int]]:
        """Candidate multiples for group ``gid``: the divisors of its reference output size (both
        axes) that leave at least two steps and refine its present multiple, smallest first."""
        pool = self.groups[gid].first
        out_h, out_w = self.sizes[self.groups[gid].path][1]
        m_h, m_w = pool.multiple
        g_h, g_w = out_h // m_h, out_w // m_w  # in steps of the present multiple
        g = math.gcd(g_h, g_w)
        return [(m_h * d, m_w * d) for d in range(2, g // 2 + 1) if g % d == 0]

    def problem_with_multiple(self, gid: int, multiple: tuple[int, int]) -> tuple[str, set[str]]:
        """``problem`` with the group's output sizes rounded to ``multiple`` (restored after)."""
        members = self.groups[gid].sites
        saved = [m.multiple for _, m in members]
        for _, m in members:
            m.multiple = multiple
        try:
            return self.problem(gid)
        finally:
            for (_, m), value in zip(members, saved):
                m.multiple = value


def validate(gm: fx.GraphModule, example: Tensor, spec: OutputSpec, reference_only: bool = False,
             joint: int = JOINT_MOVES) -> ValidationReport:
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
        for gid, g in groups.items():
            if g.path not in report.sizes:
                report.failures.append(GroupFailure(gid, "the site is not reached by the forward pass", "unreached"))
        reached = {gid: g for gid, g in groups.items() if g.path in report.sizes}
        for gid in reached:
            problem = _moved_problem(gm, example, spec, reached, report.sizes, gid)
            if problem:
                report.failures.append(GroupFailure(gid, problem))
        if not report.failures and reached:  # the joint moves also check the gradients
            report.failures += _joint_failures(gm, example, spec, reached, joint)
    finally:
        gm.train(was_training)
    return report


def _forward_backward(gm: nn.Module, example: Tensor, spec: OutputSpec,
                      params: dict[int, nn.Parameter]) -> tuple[str, list[GroupFailure]]:
    """One forward and backward of a random projection of the output: why the forward fails
    ("" if it does not), and the groups whose stride gets no gradient or a non-finite one."""
    strides = {id(p) for p in params.values()}
    frozen = [p for p in gm.parameters() if p.requires_grad and id(p) not in strides]
    for p in frozen:  # only the stride gradients are needed
        p.requires_grad_(False)
    for p in params.values():
        p.grad = None
    try:
        try:
            with quiet():
                out = gm(example)
        except Exception as err:  # a forward failure is a finding, reported verbatim
            return f"{type(err).__name__}: {one_line(err, 160)}", []
        problem = spec.mismatch(output_spec(out))
        outs = [t for t in _tensors(out) if t.is_floating_point()]
        if not problem and not all(torch.isfinite(t).all() for t in outs):
            problem = "the output is not finite"
        if problem or not params:
            return problem, []
        gen = torch.Generator().manual_seed(0)
        loss = sum((t * torch.randn(t.shape, generator=gen).to(t.device, t.dtype)).sum() for t in outs)
        try:
            loss.backward()
        except Exception as err:  # the backward itself failing is a finding for every group
            return "", [GroupFailure(g, f"backward fails: {type(err).__name__}: {one_line(err, 160)}", "gradient") for g in params]
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
    return "", failures
