"""A differentiable, exact and cheap model of a converted model's FLOPs (DESIGN.md §3).

``CostModel(model, input_size)`` is built once; calling it returns a scalar tensor equal to
fvcore's count of ``model`` at the current strides (rounded sizes) whose gradient reaches
every group's stride parameter. How:

1. **Per-node FLOPs at the reference strides**, from fvcore itself (``flops_by_module`` for
   module calls; ops at the top level of the graph are counted one by one).
2. **Size classes.** Every tensor of the fx graph carries the spatial size of one *size
   class*: the model input, a DynOPool output (``round(h / s)``), a strided or padded
   window op left unconverted (``floor((h + p - d(k-1) - 1) / s) + 1``, ceil mode,
   or timm's dynamic "same" padding ``ceil(h / s)``), an unconverted ``interpolate`` by a
   scale factor, a transposed convolution (``(h - 1) s - p + d(k-1) + output_padding + 1``),
   or a fixed size (adaptive pools, global means, ``interpolate(size=...)``).
   Every other node inherits the class of its (largest) spatial input. Each node's rule is
   chosen from a short list of candidates and *verified* on two shape passes (at the
   reference strides and at perturbed, smaller strides, or larger ones for a group whose bound
   stops it there); a node no candidate explains makes
   the build fail loudly instead of giving a silently wrong cost.
   **Token sequences** (ViTs) are classes too: ``L = h x w + e`` tokens of a spatial class
   (class, register or distillation tokens concatenated: ``e > 0``; sliced off: ``e < 0``),
   held as size ``(L, 1)``, and attention maps ``(L, L)`` (``q @ k^T``). Flattened tokens,
   heads and ``(N, heads, L, d)`` layouts inherit them (element counts in proportion). Each
   node touching them must also have FLOPs in proportion to one class's area at both
   strides (fvcore recounted at the perturbed ones: a linear layer follows ``L``,
   ``attn @ v`` follows ``L^2``), and the whole model must match fvcore's total there.
   fvcore counts ``F.scaled_dot_product_attention`` as 0 FLOPs (no handle), so it is 0 here.
3. **Evaluation**: integer sizes propagate through the classes in closed form (exactly the
   sizes the forward pass will produce) together with their continuous surrogates
   (``h / s`` instead of ``round(h / s)``) and the derivatives of those with respect to each
   group's ``(s_h, s_w)`` (forward mode, a few dozen Python operations). Each node's FLOPs
   are ``coefficient x h x w`` of the class they scale with (output size for convolutions,
   DynOPool and upsampling, input size for the rest, as fvcore counts them). The value uses
   the integer sizes; the gradient is the straight-through one, ``d(h x w) = w dh_cont + h
   dw_cont`` (token counts alike: ``dL = w dh_cont + h dw_cont``, ``d(L^2) = 2 L dL``). One
   autograd node returns value and gradient.

The code, along those seams: ``annotated_graph.py`` (the one trace and its shape passes, shared
with conversion and the report), ``cost_shapes.py`` (how two passes are compared), ``cost_rules.py`` (size
classes and their candidate rules, from the op registry), ``cost_probe.py`` (fvcore per node),
``cost_build.py`` (one walk of the graph), this module (the model and its evaluation).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, fx, nn

from .annotated_graph import AnnotatedGraph
from .cost_build import _ClassBuilder
from .cost_regions import MAX_REGION_ROUNDS, Region, regions_for
from .cost_probe import ProbeFailed, _node_flops
from .cost_rules import _TOKEN_KINDS, _accumulate, _Class, _combine, _Evaluation, _Grad, _scaled_grad
from .dynopool import DynOPool, square_mean
from .errors import UnsupportedModelError, UserInputError
from .flops import count_flops
from .group_ids import stride_groups

__all__ = ["CostModel"]


# --------------------------------------------------------------------------------------------
# the cost model


class _CostFunction(torch.autograd.Function):
    """Returns the precomputed value; backward returns the precomputed gradients."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: tuple[Tensor, ...], *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        return (None, None, *(grad_out * g for g in ctx.grads))


#: what ``CostModel.flops`` gives at strides where some map would be empty (a kept 2x2 pool fed
#: a 1x1 map under placement ``exact``): above any budget, so no fit lands there
INFEASIBLE = 2 ** 62
#: relative gap allowed between the cost model's total and fvcore's at the checked strides
TOTAL_TOLERANCE = 1e-6


#: (shape pass, check) stride factors of each build: a rule read off two passes that fails the
#: whole model's check at the third setting (two sizes that fit both passes by chance: PVT-v2's
#: keys pooled from a grid of 3x3 tokens, 1x1 at both) is built again from larger maps, and
#: checked at every check setting so far (a rule that fits by chance must not get more chances)
PERTURBATIONS: tuple[tuple[tuple[float, float], tuple[float, float]], ...] = (
    ((0.7, 0.8), (0.55, 0.65)),
    ((0.5, 0.6), (0.4, 0.45)),
)


def _one_pixel_up(c: _Class, sizes: dict) -> tuple:
    """An opaque class's probe with its input one pixel taller, and one pixel wider (its forward
    differences); None for a side where it cannot run there (halo attention takes multiples of its
    block only): the caller then takes the proportional slope (size and FLOPs follow the side)."""
    out = []
    for dh, dw in ((1, 0), (0, 1)):
        try:
            out.append(c.probed(sizes, dh=dh, dw=dw))
        except ProbeFailed:
            out.append(None)
    return out[0], out[1]


class CostModel:
    """FLOPs of ``model`` at ``input_size`` as a differentiable function of its strides.

    >>> import torch.nn as nn
    >>> from dynopool_convert import DynOPool
    >>> net = nn.Sequential(DynOPool(2.0), nn.Conv2d(3, 8, 3, padding=1))
    >>> cost = CostModel(net, (3, 32, 32))
    >>> int(cost().item()), cost.flops()   # 16*16 outputs * (8*27 conv + 3*20 DynOPool)
    (70656, 70656)

    ``cost()`` reads the current stride parameters (``cost.parameters``, one per tied group,
    as ``scale_parameters(model)``) and returns a float32 scalar whose gradient reaches them;
    ``cost.flops(strides)`` evaluates exactly (an int) at given ``(s_h, s_w)`` per group
    without touching the model. ``unattributed`` is the part of fvcore's reference count the
    build could not place on a graph node (kept as a constant; 0 on every model tested).
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> None:
        self.input_size = tuple(int(v) for v in input_size)
        graph = AnnotatedGraph(model, self.input_size)  # the reference pass: at the present strides
        gm = graph.gm
        self._dynopools: dict[str, DynOPool] = {
            n.target: gm.get_submodule(n.target)
            for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), DynOPool)
        }
        # the groups the graph calls, in the order of scale_parameters(model): one per tied group
        called = {id(m.stride) for m in self._dynopools.values()}
        groups = stride_groups(model)
        groups += [g for g in stride_groups(gm) if all(g.param is not h.param for h in groups)]
        groups = [g for g in groups if id(g.param) in called]
        self.parameters: list[nn.Parameter] = [g.param for g in groups]
        self._group_of = {id(p): i for i, p in enumerate(self.parameters)}
        # stride bounds per group (every site of a group shares them): [1/r_max, 1/r_min]
        self._bounds = [g.bounds for g in groups]
        #: per group, whether its axes share one stride (DynOPool ``square``: the two values' mean)
        self.square: list[bool] = [g.first.square for g in groups]

        ref = graph.reference
        ref_strides = self._current_strides()
        #: the strides the model had at build time, and fvcore's count there
        self.reference_strides = ref_strides
        node_flops, self.reference_flops, self._mixed = _node_flops(gm, ref, self.input_size)
        self._gm, self._ref = gm, ref
        for attempt, (pert_factors, _) in enumerate(PERTURBATIONS):
            with self._at_strides(self._moved(ref_strides, pert_factors)):
                perturbed_strides = self._current_strides()  # as the parameters hold them (float32)
                pert = graph.summaries()
            self._pert = pert
            self._perturbed_strides = perturbed_strides
            self._pert_counts: tuple[dict[fx.Node, int], int] | None = None
            self._by_proportion = False  # set when a tensor follows a class by its element count only
            self._build_classes(gm, ref, pert, ref_strides, perturbed_strides, node_flops)
            # a guessed rule (token counts, a pad's multiple) is checked once more on the whole model
            if not (self._by_proportion or any(c.kind in _TOKEN_KINDS or c.guessed for c in self._classes)):
                break
            try:  # at every check setting so far: a rebuild must pass the one that failed too
                for _, factors in PERTURBATIONS[:attempt + 1]:
                    self._check_totals(factors)
                break
            except UnsupportedModelError:
                if attempt == len(PERTURBATIONS) - 1:
                    raise

    @contextlib.contextmanager
    def _at_strides(self, strides: Sequence[tuple[float, float]]) -> Iterator[None]:
        """The model's stride parameters temporarily set to ``strides``."""
        saved = [p.detach().clone() for p in self.parameters]
        try:
            with torch.no_grad():
                for p, s in zip(self.parameters, strides):
                    p.copy_(torch.tensor(s, dtype=p.dtype).reshape(p.shape))
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.parameters, saved):
                    p.copy_(v)

    def _perturbed_counts(self) -> tuple[dict[fx.Node, int], int]:
        """fvcore's per-node FLOPs and total at the perturbed strides (counted once, when needed)."""
        if self._pert_counts is None:
            with self._at_strides(self._perturbed_strides):
                counts, total, _ = _node_flops(self._gm, self._pert, self.input_size)
            self._pert_counts = counts, total
        return self._pert_counts

    def _check_totals(self, factors: tuple[float, float]) -> None:
        """Where tokens are followed (token classes, or tensors that follow a class by their
        element count only), the whole model must also match fvcore at the perturbed strides
        (catches FLOPs that are zero at the reference, e.g. resampling) and at a third, unseen
        setting (catches sizes that fit both passes by chance, e.g. half of an even count)."""
        third = self._moved(self.reference_strides, factors)
        with self._at_strides(third):
            third = self._current_strides()
            try:
                total = count_flops(self._gm, self.input_size)
            except UserInputError as err:
                raise UnsupportedModelError(
                    f"the FLOPs budget does not support this model yet: it fails at strides {third}, where its cost "
                    f"model is checked; convert and fine-tune without a budget"
                ) from err
        for strides, fvcore in ((self._perturbed_strides, self._perturbed_counts()[1]), (third, total)):
            predicted = self.flops(strides)
            # exact up to fvcore's own rounding (MViTv2: 34 FLOPs in 375M); the budget fit
            # confirms its result with fvcore, so this slack never lets a model over budget
            if abs(predicted - fvcore) > TOTAL_TOLERANCE * fvcore:
                raise UnsupportedModelError(
                    f"the FLOPs budget does not support this model yet: its cost model predicts {predicted} FLOPs "
                    f"where fvcore counts {fvcore} (at strides {strides}); convert and fine-tune without a budget"
                )

    # -- build ---------------------------------------------------------------------------

    # -- strides: the public interface budget.py uses ------------------------------------

    @property
    def bounds(self) -> list[tuple[float, float]]:
        """Per group, the stride bounds ``(lo, hi)`` = ``(1 / r_max, 1 / r_min)`` its sites share."""
        return list(self._bounds)

    def clamp(self, strides: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        """``strides`` (one ``(s_h, s_w)`` per group) clamped to the groups' bounds, as DynOPool does."""
        return self._clamp_all(strides)

    def current_strides(self) -> list[tuple[float, float]]:
        """The groups' present strides, clamped to their bounds."""
        return self._current_strides()

    def _current_strides(self) -> list[tuple[float, float]]:
        if not self.parameters:
            return []
        values = torch.stack([p.detach().reshape(2) for p in self.parameters]).cpu().tolist()
        return self._clamp_all(values)

    def _build_classes(self, gm, ref, pert, ref_strides, pert_strides, node_flops) -> None:
        regions: list[Region] = []
        self._region_memos: dict[tuple, dict] = {}  # probes of equal regions, shared
        for round_ in range(MAX_REGION_ROUNDS + 1):
            b = _ClassBuilder(self, gm, ref, pert, ref_strides, pert_strides, node_flops, regions)
            try:
                b.run()
                break
            except UnsupportedModelError:
                # no rule follows b.current: probe the module around it whole, then build again
                found = regions_for(gm, b.current, ref, regions) if b.current is not None else None
                if found is None or round_ == MAX_REGION_ROUNDS:
                    raise
                regions = found
        self.regions = [r.path for r in regions]
        self._by_proportion = b.by_proportion
        self.unattributed = int(round(self.reference_flops - b.attributed()))
        self._constant = b.constant + self.unattributed
        self._classes = b.classes
        self._terms = [b.terms[i] for i in sorted(b.terms)]
        self._opaque_terms = b.opaque_terms
        self._resize_terms = b.resize_terms
        self._eval_classes = b.eval_classes(self._terms)

    def _verified_flops_class(self, n: fx.Node, flops: int,
                              candidates: Sequence[tuple[_Class, tuple[int, int], tuple[int, int]]]) -> _Class | None:
        """The first candidate class (with its sizes at the reference and perturbed strides)
        whose area ``n``'s FLOPs are proportional to at both (a linear layer follows its
        tokens, ``attn @ v`` the attention map); None for a node without FLOPs at both;
        refuses any other node."""
        flops_p = self._perturbed_counts()[0].get(n, 0)
        if flops == flops_p == 0:
            return None
        for c, (h_r, w_r), (h_p, w_p) in candidates:
            if h_r * w_r and flops * h_p * w_p == flops_p * h_r * w_r:
                return c
        raise UnsupportedModelError(
            f"the FLOPs budget does not support this model yet: the FLOPs of node {n.name!r} ({flops} at the "
            f"reference strides, {flops_p} at smaller strides) follow no size its cost model knows; "
            f"convert and fine-tune without a budget"
        )

    def _moved(self, strides: Sequence[tuple[float, float]], factors: tuple[float, float]) -> list[tuple[float, float]]:
        """``strides`` times ``factors`` per axis (smaller: larger maps), divided by them instead
        where a bound stops the move (a group capped at its reference scale factor), so that
        every group moves in the shape passes."""
        out = []
        for pair, (lo, hi) in zip(strides, self._bounds):
            moved = []
            for s, f in zip(pair, factors):
                t = min(max(s * f, lo), hi)
                moved.append(t if abs(t - s) > 1e-6 * s else min(max(s / f, lo), hi))
            out.append((moved[0], moved[1]))
        return out

    def _clamp_all(self, strides: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
        out = []
        for s, (lo, hi), square in zip(strides, self._bounds, self.square):
            s_h, s_w = (square_mean(s),) * 2 if square else (s[0], s[1])
            out.append((min(max(s_h, lo), hi), min(max(s_w, lo), hi)))
        return out

    # -- evaluation ----------------------------------------------------------------------

    def _propagate(self, c: _Class, sizes: dict[int, tuple[int, int]], cont: dict[int, tuple[float, float]],
                   deriv: dict[int, tuple[_Grad, _Grad]], strides: Sequence[tuple[float, float]],
                   raw: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], tuple[_Grad, _Grad]]:
        """Class ``c``'s continuous size and its derivatives by the strides, from its parents'."""
        if c.kind in ("input", "const"):
            return (float(c.size[0]), float(c.size[1])), ({}, {})
        ph, pw = cont[c.parent.index]
        dh0, dw0 = deriv[c.parent.index]
        if c.kind == "cross":  # (h * w, h2 * w2): each area by the product rule
            areas, grads = [], []
            for src in (c.parent, c.other):
                (h_in, w_in), (sh, sw), (dh_, dw_) = sizes[src.index], cont[src.index], deriv[src.index]
                areas.append(sh * sw)
                grads.append(_combine(dh_, w_in, dw_, h_in))
            return (areas[0], areas[1]), (grads[0], grads[1])
        if c.kind == "pooled":  # a 1-d window over h * w tokens: (h * w + p - d(k-1) - 1) / s + 1
            h_in, w_in = sizes[c.parent.index]
            k, stride, pad, dil, _ = c.params
            return ((ph * pw + pad - dil * (k - 1) - 1) / stride + 1, 1.0), (_combine(dh0, w_in / stride, dw0, h_in / stride), {})
        if c.kind in _TOKEN_KINDS:  # h * w (+ e): the product rule at the integer sizes, as for terms
            h_in, w_in = sizes[c.parent.index]
            n = ph * pw + (c.params[0] if c.kind in ("tokens", "pairs") and c.params else 0)
            dn = _combine(dh0, w_in, dw0, h_in)
            return ((n, 1.0), (dn, {})) if c.kind == "tokens" else ((n, n), (dn, dn))
        if c.kind == "opaque":  # forward differences of the probed size function
            out_h, out_w = sizes[c.index]
            (in_h, in_w), (up_h, up_w) = sizes[c.parent.index], _one_pixel_up(c, sizes)
            sh = up_h[0][0] - out_h if up_h else out_h / in_h
            sw = up_w[0][1] - out_w if up_w else out_w / in_w
            return (float(out_h), float(out_w)), (_scaled_grad(dh0, sh), _scaled_grad(dw0, sw))
        if c.kind == "dynopool":
            s_h, s_w = strides[c.group]
            fh, fw = c.base[0] / s_h, c.base[1] / s_w
            dh, dw = _scaled_grad(dh0, fh), _scaled_grad(dw0, fw)
            lo, hi = self._bounds[c.group]
            # the stride is clamped to its bounds: no gradient outside them
            if lo <= raw[c.group][0] <= hi:
                dh[(c.group, 0)] = dh.get((c.group, 0), 0.0) - ph * fh * fh / c.base[0]
            if lo <= raw[c.group][1] <= hi:
                dw[(c.group, 1)] = dw.get((c.group, 1), 0.0) - pw * fw * fw / c.base[1]
            return (ph * fh, pw * fw), (dh, dw)
        if c.kind == "window":
            fh, fw = 1.0 / c.params[0][1], 1.0 / c.params[1][1]
        elif c.kind == "same":
            fh, fw = 1.0 / c.params[0], 1.0 / c.params[1]
        elif c.kind == "transposed":  # (n - 1) * s + const
            fh, fw = float(c.params[0][1]), float(c.params[1][1])
        elif c.kind in ("multiple", "crop"):  # padded or cropped: the size itself, up to less than a multiple
            fh, fw = 1.0, 1.0
        else:  # scale
            fh, fw = c.params
        return (ph * fh, pw * fw), (_scaled_grad(dh0, fh), _scaled_grad(dw0, fw))

    def _evaluate(self, strides: Sequence[tuple[float, float]], with_grad: bool = True) -> _Evaluation:
        n_groups = len(self.parameters)
        raw = list(strides)
        strides = self._clamp_all(raw)
        sizes: dict[int, tuple[int, int]] = {}
        cont: dict[int, tuple[float, float]] = {}
        # derivatives of the continuous sizes: {class: (dh, dw)}, each {(group, axis): d size / d s_axis}
        # (spatial sizes depend on one axis of strides; a token count h*w + e on both)
        deriv: dict[int, tuple[_Grad, _Grad]] = {}
        for c in self._eval_classes:
            sizes[c.index] = c.predict(sizes, strides)
            cont[c.index], deriv[c.index] = self._propagate(c, sizes, cont, deriv, strides, raw)
        flops = self._constant
        grads = [[0.0, 0.0] for _ in range(n_groups)]
        for c in self._opaque_terms:
            f = c.probed(sizes)[1]
            flops += f
            if with_grad:
                (h, w), (up_h, up_w) = sizes[c.parent.index], _one_pixel_up(c, sizes)
                fh = up_h[1] - f if up_h else f / h
                fw = up_w[1] - f if up_w else f / w
                dh, dw = deriv[c.parent.index]
                _accumulate(grads, _combine(dh, fh, dw, fw))
        for r in self._resize_terms:
            flops += r.flops(sizes)
            if with_grad:  # straight-through, also at the identity (where the charge is 0)
                h, w = sizes[r.cls.index]
                dh, dw = deriv[r.cls.index]
                _accumulate(grads, _combine(dh, r.per_pixel * w, dw, r.per_pixel * h))
        for t in self._terms:
            h, w = sizes[t.cls.index]
            flops += t.coefficient * h * w
            if with_grad:
                dh, dw = deriv[t.cls.index]
                _accumulate(grads, _combine(dh, t.coefficient * w, dw, t.coefficient * h))
        for g, square in enumerate(self.square):  # each raw value moves both axes by half its change
            if square:
                grads[g] = [(grads[g][0] + grads[g][1]) / 2.0] * 2
        return _Evaluation(flops, [tuple(g) for g in grads], sizes)

    def _evaluate_if_runnable(self, strides: Sequence[Sequence[float]] | None) -> _Evaluation | None:
        """Sizes and FLOPs at ``strides`` (default: current), no gradient; None where a probed
        leaf cannot run at its inputs' sizes."""
        s = self._current_strides() if strides is None else [tuple(map(float, v)) for v in strides]
        try:
            return self._evaluate(s, with_grad=False)
        except ProbeFailed:
            return None

    def flops(self, strides: Sequence[Sequence[float]] | None = None) -> int:
        """Exact FLOPs (int) at ``strides`` (one ``(s_h, s_w)`` per group; default: current);
        ``INFEASIBLE`` where some map would be empty, or a probed leaf cannot run at its inputs'
        sizes (MobileNetV5's fusion of a smaller map with a larger one): the forward fails there."""
        ev = self._evaluate_if_runnable(strides)
        if ev is None or any(h < 1 or w < 1 for h, w in ev.sizes.values()):
            return INFEASIBLE
        return int(round(ev.flops))

    def group_sizes(self, strides: Sequence[Sequence[float]] | None = None) -> list[tuple[tuple[int, int], tuple[int, int]] | None] | None:
        """Input and output size of each group's first site that any FLOPs depend on, at
        ``strides`` (default: current); ``None`` for a group on whose sizes no FLOPs depend;
        ``None`` in all where a probed leaf cannot run (``flops`` says ``INFEASIBLE`` there)."""
        ev = self._evaluate_if_runnable(strides)
        if ev is None:
            return None
        sizes = ev.sizes
        out: list[tuple[tuple[int, int], tuple[int, int]] | None] = [None] * len(self.parameters)
        for c in self._eval_classes:
            if c.kind == "dynopool" and out[c.group] is None:
                out[c.group] = (sizes[c.parent.index], sizes[c.index])
        return out

    def gradient(self, strides: Sequence[Sequence[float]] | None = None) -> list[tuple[float, float]]:
        """d FLOPs / d (s_h, s_w) per group (straight-through), as floats."""
        s = self._current_strides() if strides is None else [tuple(map(float, v)) for v in strides]
        return self._evaluate(s).grads

    def __call__(self) -> Tensor:
        """FLOPs at the current strides: a float32 scalar differentiable in every group's stride."""
        if not self.parameters:
            return torch.tensor(float(self._constant))
        raw = torch.stack([p.detach().reshape(2) for p in self.parameters]).cpu().tolist()
        ev = self._evaluate([tuple(v) for v in raw])
        device = self.parameters[0].device
        value = torch.tensor(ev.flops, dtype=torch.float32, device=device)
        grads = tuple(
            torch.tensor(g, dtype=p.dtype, device=p.device).reshape(p.shape) for g, p in zip(ev.grads, self.parameters)
        )
        return _CostFunction.apply(value, grads, *self.parameters)
