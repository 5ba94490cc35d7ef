"""Code fx could not trace, from the Swin detection and segmentation repositories: NumPy's scalar
math on sizes (``numpy_sizes.py``), item assignment on a tensor built from sizes and traced
values stored on a submodule (``proxy_mutations.py``). Each converts, exact at init, and runs at
moved strides as the Python code does."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy import ceil as np_ceil
from torch import nn

from dynopool_convert import convert, scale_parameters
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops
from dynopool_convert.tracing import trace_model


class WindowPad(nn.Module):
    """A strided conv, then the map padded to whole windows with ``np.ceil`` (and a function
    imported from NumPy by name), a mask built per forward by item assignment."""

    def __init__(self, ws: int = 4) -> None:
        super().__init__()
        self.ws = ws
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.down(x)
        h, w = x.shape[2:]
        hp = int(np.ceil(h / self.ws)) * self.ws
        wp = int(np_ceil(w / self.ws)) * self.ws
        mask = torch.zeros((1, 1, hp, wp), device=x.device)
        mask[:, :, :h, :w] = 1.0
        x = self.mix(F.pad(x, (0, wp - w, 0, hp - h))) * mask
        return self.head(x.sum((2, 3)) / mask.sum())


class GridBlock(nn.Module):
    """Reads the grid its caller stores on it (``blk.H, blk.W = H, W``) and branches on it:
    kept whole (no site inside), it must see the grid of the current call."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.H = self.W = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        if L != self.H * self.W:
            raise RuntimeError(f"{L} tokens for a {self.H}x{self.W} grid")
        y = self.proj(x).view(B, self.H, self.W, C)
        return (y * torch.arange(self.W, dtype=y.dtype).view(1, 1, -1, 1)).flatten(1, 2)


class Stored(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.blocks = nn.ModuleList([GridBlock(8), GridBlock(8)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        H, W = x.size(2), x.size(3)
        x = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            blk.H, blk.W = H, W
            x = blk(x)
        return self.head(x.mean(1))


def _moved(result, factor: float = 0.77):
    model = result.model
    with torch.no_grad():
        for p in scale_parameters(model):
            p.mul_(factor)
    return model


def test_numpy_on_sizes_and_item_assignment_trace_and_follow_moved_strides():
    torch.manual_seed(0)
    model = WindowPad().eval()
    traced = trace_model(model).graph_module
    targets = {getattr(n.target, "__module__", None) for n in traced.graph.nodes if n.op == "call_function"}
    assert "dynopool_convert.numpy_sizes" in targets
    assert any(n.target.__name__ == "setitem" for n in traced.graph.nodes if n.op == "call_function")
    assert np.ceil is np.ceil and isinstance(np.ceil, np.ufunc)  # NumPy itself given back
    x = torch.randn(2, 3, 30, 26)
    result = convert(model, input_size=(3, 30, 26), placement="exact")
    assert [s.status for s in result.plan.sites] == ["converted"]
    assert torch.allclose(result.model.eval()(x), model(x), atol=1e-6)
    moved = _moved(result).eval()
    sizes = {}
    moved.get_submodule("mix").register_forward_hook(lambda m, i, o: sizes.update(mix=tuple(o.shape[2:])))
    out = moved(x)
    assert torch.isfinite(out).all()
    hp = sizes["mix"]
    assert hp != (16, 16) and hp[0] % 4 == 0 and hp[1] % 4 == 0  # padded to whole windows at the moved size


def test_the_cost_model_follows_a_tensor_made_at_a_multiple_of_the_grid():
    """``torch.zeros((1, 1, ceil(h / ws) * ws, ...))``: a class of its own (a multiple), like a pad."""
    torch.manual_seed(0)
    result = convert(WindowPad().eval(), input_size=(3, 30, 26))
    cost = CostModel(result.model, (3, 30, 26))
    for factor in (0.6, 0.77, 1.3):
        with torch.no_grad():
            for p in scale_parameters(result.model):
                p.fill_(factor)
        assert cost.flops() == count_flops(result.model, (3, 30, 26))


def test_a_grid_stored_on_a_kept_whole_block_is_set_before_each_call():
    torch.manual_seed(0)
    model = Stored().eval()
    before = [(b.H, b.W) for b in model.blocks]
    traced = trace_model(model)
    assert [(b.H, b.W) for b in model.blocks] == before  # no Proxy left on the model
    assert any("GridBlock as a leaf" in note for note in traced.notes)
    stores = [n for n in traced.graph_module.graph.nodes if getattr(n.target, "__name__", "") == "set_module_attribute"]
    assert len(stores) == 4
    traced.graph_module.graph.eliminate_dead_code()  # a side effect: kept
    assert len([n for n in traced.graph_module.graph.nodes if n in stores]) == 4
    x = torch.randn(2, 3, 16, 12)
    result = convert(model, input_size=(3, 16, 12), placement="exact")
    assert torch.allclose(result.model.eval()(x), model(x), atol=1e-6)
    moved = _moved(result).eval()
    out = moved(x)  # GridBlock raises unless it reads the moved grid
    grid = (moved.get_submodule("blocks.0").H, moved.get_submodule("blocks.0").W)
    assert grid != (8, 6) and torch.isfinite(out).all()


def test_numpy_is_given_back_and_plain_numbers_get_numpys_results():
    import sys

    from dynopool_convert.numpy_sizes import numpy_of_sizes

    here = vars(sys.modules[__name__])
    with numpy_of_sizes({__name__}):
        assert here["np"] is not np.__class__ and here["np"].__name__ == "numpy" and here["np"] is not sys.modules["numpy"]
        assert here["np"].ceil(2.5) == 3.0 and here["np_ceil"](1.2) == 2.0  # plain numbers: NumPy's result
        assert here["np"].zeros(2).shape == (2,)  # anything else: NumPy's own
    assert here["np"] is sys.modules["numpy"] and here["np_ceil"] is sys.modules["numpy"].ceil
