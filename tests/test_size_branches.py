"""Branches on traced sizes (``size_branches.py``): research code that fx refused ("symbolically
traced variables cannot be used as inputs to control flow") in the model's own forward or in a
module holding a resizing op converts, each such branch taken as at the reference size (a note
says which); conditions on tensor values are still refused, and modules without a site that
branch on sizes are still kept whole."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynopool_convert import apply_plan, convert, scale_parameters
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.errors import UserInputError
from dynopool_convert.flops import count_flops
from dynopool_convert.tracing import trace_model


class PaddedPatchEmbed(nn.Module):
    """The Swin paper code's: pads the image to whole patches (a site inside: not kept whole)."""

    def __init__(self, p: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.p = p
        self.proj = nn.Conv2d(3, dim, p, stride=p)

    def forward(self, x):
        _, _, h, w = x.size()
        if w % self.p != 0:
            x = F.pad(x, (0, self.p - w % self.p))
        if h % self.p != 0:
            x = F.pad(x, (0, 0, 0, self.p - h % self.p))
        return self.proj(x)


class PVTish(nn.Module):
    """PVT's position table, interpolated in the model's own forward unless the grid is the one
    it was made for; the Swin code's patch merging, padded on odd sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PaddedPatchEmbed()
        self.num_patches = 64
        self.pos_embed = nn.Parameter(torch.randn(1, 64, 16) * 0.02)
        self.reduction = nn.Linear(64, 32)
        self.head = nn.Linear(32, 5)

    def _pos(self, h, w):
        if h * w == self.num_patches:
            return self.pos_embed
        grid = self.pos_embed.reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=(h, w), mode="bilinear").flatten(2).transpose(1, 2)

    def forward(self, x):
        x = self.patch_embed(x)
        b, c, h, w = x.shape
        x = (x.flatten(2).transpose(1, 2) + self._pos(h, w)).view(b, h, w, c)
        if h % 2 == 1 or w % 2 == 1:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.head(self.reduction(x).mean((1, 2)))


def test_without_an_example_such_a_model_cannot_be_traced():
    with pytest.raises(UserInputError, match="cannot trace PVTish"):
        trace_model(PVTish().eval())


def test_branches_on_sizes_are_taken_as_at_the_reference_size_and_the_grid_learns():
    torch.manual_seed(0)
    original = PVTish().eval()
    r = convert(original, (3, 32, 32))
    site = r.plan.site("patch_embed.proj")
    assert site.status == "converted"
    branches = [n for n in r.plan.notes if "branch on sizes fixed" in n]
    assert len(branches) == 5 and any("if h * w == self.num_patches:" in n and "True" in n for n in branches)
    x = torch.randn(2, 3, 32, 32)
    exact = convert(original, (3, 32, 32), placement="exact").model.eval()
    assert torch.equal(exact(x), original(x))
    replayed = apply_plan(PVTish(), r.plan)
    replayed.load_state_dict(r.model.state_dict())
    with torch.no_grad():
        for p in scale_parameters(r.model) + scale_parameters(replayed):
            p.fill_(0.7)  # a 12 x 12 grid (rounded to even: the merging takes no odd sizes)
    torch.testing.assert_close(replayed.eval()(x), r.model.eval()(x), rtol=0, atol=0)
    budget = int(0.7 * count_flops(r.model, (3, 32, 32)))
    with torch.no_grad():
        scale_parameters(r.model)[0].fill_(1.0)
    fit = fit_to_budget(r.model, budget, (3, 32, 32), CostModel(r.model, (3, 32, 32)))
    assert fit.final_flops <= budget and fit.final_flops == count_flops(r.model, (3, 32, 32))


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        if x.mean() > 0:  # on tensor values: no size decides it
            x = -x
        return self.conv(x)


def test_a_branch_on_tensor_values_is_still_refused():
    with pytest.raises(UserInputError, match="cannot trace ValueBranch"):
        convert(ValueBranch(), (3, 16, 16))


class SizeGate(nn.Module):
    """Branches on its input's width, holds no resizing op: kept whole, as before."""

    def forward(self, x):
        return x * 2 if x.shape[-1] > 4 else x


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = SizeGate()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.gate(x)).mean((2, 3))


def test_a_module_without_sites_that_branches_on_sizes_is_still_kept_whole():
    r = convert(WithGate(), (3, 16, 16))
    assert r.plan.site("pool").status == "converted"
    assert any("traced SizeGate as a leaf" in n for n in r.plan.notes)
    assert not any("branch on sizes fixed" in n for n in r.plan.notes)


class DataShaped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        if (x > 0).nonzero().shape[0] > x.numel() // 2:  # a shape that counts values
            x = -x
        return self.conv(x)


class BatchBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        if x.shape[0] == 1:  # the batch, not the image
            y = y * 2
        return y


@pytest.mark.parametrize("model", [DataShaped, BatchBranch])
def test_a_branch_on_counted_values_or_on_the_batch_is_still_refused(model):
    with pytest.raises(UserInputError, match=f"cannot trace {model.__name__}"):
        convert(model(), (3, 16, 16))


class PadOdd(nn.Module):
    """No site inside: kept whole, its branch runs at every size."""

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return x


class RootBranchThenPad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.pad = PadOdd()
        self.pool = nn.AvgPool2d(2)

    def forward(self, x, out_indices=(0, 1)):
        y = self.down(x)
        if y.shape[-1] == 8:  # the root's own: taken as at the reference
            y = y + 1
        return self.pool(self.pad(y)).mean((2, 3)) * len(out_indices)


def test_a_module_without_sites_stays_whole_after_the_roots_branch_is_taken():
    torch.manual_seed(0)
    original = RootBranchThenPad().eval()
    r = convert(original, (3, 16, 16))
    assert any("traced PadOdd as a leaf" in n for n in r.plan.notes)
    assert [n for n in r.plan.notes if "branch on sizes fixed" in n][0].count("if y.shape[-1] == 8:") == 1
    assert r.plan.site("down").status == r.plan.site("pool").status == "converted"
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(convert(original, (3, 16, 16), placement="exact").model.eval()(x), original(x))


class ContainerDefaults(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x, out_indices=(0, 1), scales={"a": 2.0}):  # noqa: B006 (a default as research code writes it)
        y = self.down(x)
        return {"logits": y.mean((2, 3)) * len(out_indices) * scales["a"], "maps": [y]}


def test_a_forward_with_container_defaults_traces_and_returns_what_the_model_returns():
    # fx flattened the tuple into placeholders whose generated signature did not compile (SyntaxError)
    model = ContainerDefaults().eval()
    traced = trace_model(model).graph_module
    x = torch.randn(1, 3, 16, 16)
    out, ref = traced(x), model(x)
    assert torch.equal(out["logits"], ref["logits"]) and torch.equal(out["maps"][0], ref["maps"][0])
    assert convert(model, (3, 16, 16)).plan.site("down").status == "converted"
