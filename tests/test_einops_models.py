"""Models written with einops (lucidrains/vit-pytorch and much research code): fx cannot trace
into ``rearrange`` (einops asks its backend registry for the type of a Proxy), so a model whose
strided ops sit next to one was refused ("cannot trace CCT with torch.fx"). einops' functions are
now recorded as single calls and its layers kept whole; ``torch.einsum`` attention is counted
exactly (fvcore rounds its einsum count to four digits), so the cost model follows it."""
from __future__ import annotations

import math
import random

import einops
import torch
from einops import rearrange
from einops.layers.torch import Rearrange
import torch.nn.functional as F
from torch import nn

from dynopool_convert import convert, scale_parameters
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops


class Tokenizer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, dim, 3, 1, 1, bias=False), nn.ReLU(), nn.MaxPool2d(3, 2, 1))

    def forward(self, x):
        return rearrange(self.conv(x), "b c h w -> b (h w) c")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (einops.rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        attn = torch.einsum("b h i d, b h j d -> b h i j", q * self.scale, k).softmax(dim=-1)
        return self.proj(rearrange(torch.einsum("b h i j, b h j d -> b h i d", attn, v), "b h n d -> b n (h d)"))


class TinyCCT(nn.Module):
    """lucidrains' CCT in small: conv tokenizer, learned position embedding added in place,
    einsum attention, sequence pooling."""

    def __init__(self, size: int = 16, dim: int = 16) -> None:
        super().__init__()
        self.tokenizer = Tokenizer(dim)
        self.pos = nn.Parameter(torch.randn(1, (size // 2) ** 2, dim) * 0.2)
        self.attn = Attention(dim)
        self.pool = nn.Linear(dim, 1)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.tokenizer(x)
        x += self.pos
        x = x + self.attn(x)
        w = rearrange(self.pool(x), "b n 1 -> b n").softmax(dim=1)
        return self.fc(torch.einsum("b n, b n d -> b d", w, x))


class StemThenPatches(nn.Module):
    """A strided conv stem, then patches by a ``Rearrange`` layer (simple_vit.py's patchify)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 2, 1)
        self.patches = Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=2, p2=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.patches(self.stem(x)).mean(1))


def test_einsum_is_counted_exactly():
    class E(nn.Module):
        def forward(self, x):
            t = x.flatten(2)  # 1 x 3 x 1369
            return torch.einsum("bci,bcj->bij", t, t[:, :, :7]), torch.einsum("b c i, c j -> b i j", t, t[0, :, :7])

    assert count_flops(E(), (3, 37, 37)) == 2 * 3 * 1369 * 7  # fvcore's own: 28750 for the second


def test_cct_with_einops_converts_follows_its_position_embedding_and_its_budget():
    torch.manual_seed(0)
    original = TinyCCT().eval()
    r = convert(original, (3, 16, 16), placement="exact")
    assert r.plan.site("tokenizer.conv.2").status == "converted"
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(r.model.eval()(x), original(x))
    cost = CostModel(r.model, (3, 16, 16))
    rng = random.Random(0)
    for _ in range(3):
        with torch.no_grad():
            for p in scale_parameters(r.model):
                p.copy_(torch.tensor([rng.uniform(1.3, 3.0), rng.uniform(1.3, 3.0)]))
        assert cost.flops() == count_flops(r.model, (3, 16, 16))
        assert r.model(x).shape == (2, 10)
    with torch.no_grad():
        for p in scale_parameters(r.model):
            p.fill_(2.0)
    budget = int(0.6 * count_flops(original, (3, 16, 16)))
    fit = fit_to_budget(r.model, budget, (3, 16, 16), cost)
    assert fit.final_flops <= budget and fit.final_flops == count_flops(r.model, (3, 16, 16))


def test_a_rearrange_layer_is_kept_whole_and_the_stem_before_it_learns():
    """The stem learns freely; the patches' grid is a site of its own (``patch_reshape.py``),
    resizing the stem's map to a multiple of the patch (until then the stem was rounded to one)."""
    r = convert(StemThenPatches(), (3, 16, 16))
    stem, patches = r.plan.site("stem"), r.plan.site("patches_patches")
    assert stem.status == patches.status == "converted" and stem.group != patches.group
    assert r.plan.groups[patches.group].multiple == [2, 2]
    x = torch.randn(1, 3, 16, 16)
    tokens = {}
    r.model.get_submodule("patches").register_forward_hook(lambda m, i, o: tokens.update(n=o.shape[1]))
    with torch.no_grad():
        scale_parameters(r.model)[0].copy_(torch.tensor([2.7, 1.6]))  # stem: 6x10, so 3x5 patches
        assert r.model(x).shape == (1, 10) and tokens["n"] == 3 * 5


class SizeBuiltins(nn.Module):
    """``len``, ``int`` and ``float`` of traced sizes in the model's own forward (fx refuses
    them on a Proxy unless ``torch.fx.wrap``-ped)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.conv(x)
        side = int(math.sqrt(y.shape[2] * y.shape[3]))
        scale = float(y.shape[-1]) / 8.0
        return self.fc(y.reshape(len(y), 4, side * side).mean(-1) * scale)


def test_int_float_and_len_of_sizes_are_recorded_in_the_models_own_code():
    from dynopool_convert.tracing import trace_model
    from torch.fx import _symbolic_trace

    model = SizeBuiltins().eval()
    r = convert(model, (3, 16, 16))
    assert r.plan.site("conv").status == "converted"
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(convert(model, (3, 16, 16), placement="exact").model(x), model(x))
    with torch.no_grad():  # 8 x 8 -> 6 x 6: the sizes are read at run time
        scale_parameters(r.model)[0].fill_(16 / 6)
        assert r.model(x).shape == (2, 10)
    targets = {n.target for n in trace_model(model).graph_module.graph.nodes if n.op == "call_function"}
    assert {int, float, len} <= targets
    # the model's module is patched while tracing only (fx's generated code registers its own)
    assert all(g is not globals() for g in _symbolic_trace._wrapped_fns_to_patch.values())
    assert int("3") == 3 and float("2") == 2.0 and len([1]) == 1


class IsInstanceInForward(nn.Module):
    """``isinstance(k, int)`` in the model's own forward: ``int`` stays a type (it is wrapped only
    after a trace failed on ``int`` of a traced value)."""

    def __init__(self, k=2) -> None:
        super().__init__()
        self.k = k
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        k = self.k if isinstance(self.k, int) else self.k[0]
        return F.max_pool2d(self.conv(x), k).mean((2, 3))


def test_isinstance_of_int_in_the_models_own_code_still_traces():
    r = convert(IsInstanceInForward(), (3, 16, 16))
    assert r.plan.site("conv").status == "converted"
