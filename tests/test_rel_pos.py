"""Relative-position attention biases follow a DynOPool site's grid (``rel_pos.py``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dynopool_convert as dc
from dynopool_convert.rel_pos import _is_relative, pair_index, regrid_rel_bias

SIZE = (3, 32, 32)
BEIT = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 5}


def _table_bias(table: torch.Tensor, grid: tuple[int, int], ref: tuple[int, int]) -> torch.Tensor:
    """The bias a relative-position table (laid out for ``ref``) gives the tokens of ``grid``,
    pair by pair, offsets clamped to the table's range."""
    (h, w), (rh, rw) = grid, ref
    coords = [(y, x) for y in range(h) for x in range(w)]
    out = torch.empty(table.shape[1], h * w, h * w)
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            dy = max(-(rh - 1), min(rh - 1, yi - yj))
            dx = max(-(rw - 1), min(rw - 1, xi - xj))
            out[:, i, j] = table[(dy + rh - 1) * (2 * rw - 1) + dx + rw - 1]
    return out


@pytest.mark.parametrize("grid", [(6, 8), (10, 10), (3, 12), (13, 11)])
def test_regrid_reads_the_table_at_each_pairs_offset(grid):
    """From the reference bias of a 10x10 grid alone, every pair of another grid (smaller,
    wider, or larger: offsets clamped) gets its offset's table entry."""
    torch.manual_seed(0)
    ref = (10, 10)
    table = torch.randn((2 * ref[0] - 1) * (2 * ref[1] - 1), 3)
    bias = _table_bias(table, ref, ref)
    got = regrid_rel_bias(bias, torch.zeros(1, 1, *grid), ref, prefix=0)
    assert torch.equal(got, _table_bias(table, grid, ref))
    assert regrid_rel_bias(bias, torch.zeros(1, 1, *ref), ref, prefix=0) is bias  # exact at the reference


def test_prefix_tokens_keep_their_rows_and_columns():
    torch.manual_seed(0)
    ref, prefix = (4, 5), 1
    table = torch.randn(7 * 9, 2)
    inner = _table_bias(table, ref, ref)
    bias = torch.empty(2, 21, 21)
    bias[:, 1:, 1:] = inner
    bias[:, 0, 1:], bias[:, 1:, 0], bias[:, 0, 0] = 0.5, -0.5, 2.0  # class token to, from, and to itself
    assert _is_relative(bias, ref, prefix)
    got = regrid_rel_bias(bias, torch.zeros(1, 1, 3, 3), ref, prefix)
    assert got.shape == (2, 10, 10) and torch.equal(got[:, 1:, 1:], _table_bias(table, (3, 3), ref))
    assert (got[:, 0, 1:] == 0.5).all() and (got[:, 1:, 0] == -0.5).all() and (got[:, 0, 0] == 2.0).all()
    bias[0, 0, 3] = 0.0  # a class-token row that is not constant along the grid: not a table's
    assert not _is_relative(bias, ref, prefix)


def test_pair_index_is_the_identity_at_the_reference():
    rows, cols = pair_index((4, 6), (4, 6), 2)
    torch.manual_seed(0)
    assert not _is_relative(torch.randn(26, 26), (4, 6), 2)  # a learned L x L matrix (gMLP's): left alone
    assert rows.shape == cols.shape == (26, 26)


def test_beit_learns_its_patch_grid_exact_at_init_within_budget():
    """A small BEiT (class token, relative-position tables in every block) converts with a
    learned patch grid (before: no learned group), exact at init under placement ``exact``,
    runs and backpropagates at moved strides, and fits half its FLOPs by fvcore's count."""
    from dynopool_convert.exactness import check_exact

    torch.manual_seed(0)
    report = check_exact(dc.build_model("timm:beit_base_patch16_224", BEIT), SIZE)
    assert report.ok and report.groups == 1
    result = dc.convert(dc.build_model("timm:beit_base_patch16_224", BEIT), input_size=SIZE)
    assert result.plan.summary()["groups"] == 1
    assert sum("relative-position bias" in n for n in result.plan.notes) == BEIT["depth"]
    model = result.model
    with torch.no_grad():
        for p in dc.scale_parameters(model):
            p.mul_(1.3)
    out = model(torch.randn(2, *SIZE))
    out.sum().backward()
    assert out.shape == (2, 5) and all(torch.isfinite(p.grad).all() for p in dc.scale_parameters(model))
    from dynopool_convert.report.graph import ReportGraph
    from dynopool_convert.report.receptive_field import receptive_fields

    rf = receptive_fields(ReportGraph(model, SIZE))  # the biases read the grid's size, not its pixels
    assert not [n for n in rf.approximate if n.startswith("regrid_rel_bias")]
    assert all(rf.fields[n.name].size == (1.0, 1.0) for n in model.graph.nodes if n.name.startswith("regrid_rel_bias"))
    original = dc.count_flops(dc.build_model("timm:beit_base_patch16_224", BEIT), SIZE)
    fitted = dc.convert(dc.build_model("timm:beit_base_patch16_224", BEIT), input_size=SIZE).model
    fit = dc.fit_to_budget(fitted, original // 2, SIZE)
    assert fit.final_flops == dc.count_flops(fitted, SIZE) <= original // 2


class _MixerBias(nn.Module):
    """Attention over patch tokens with a learned L x L bias that is not relative (any pair its own
    value): nothing may make it follow the grid, so the patch grid cannot learn."""

    def __init__(self, zeros: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.bias = nn.Parameter(torch.zeros(64, 64) if zeros else torch.randn(64, 64))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        attn = (t @ t.transpose(1, 2) + self.bias).softmax(-1)
        return self.head((attn @ t).mean(1))


@pytest.mark.parametrize("zeros", [False, True])
def test_a_bias_that_is_not_relative_is_left_alone(zeros):
    """Also when it starts at zero (translation-invariant by its values, not by construction)."""
    result = dc.convert(_MixerBias(zeros), input_size=SIZE)
    assert not any("relative-position bias" in n for n in result.plan.notes)
    assert result.plan.summary()["groups"] == 0


def test_coatnet_fits_a_budget_with_its_biases_following():
    """timm's test CoAtNet: relative-position biases in its transformer stages follow their
    grids (five learned groups, none pinned) and the model fits half its FLOPs by fvcore's
    count. (The index tensors were once cached while the cost model's shape passes ran under
    FakeTensorMode, and the fake tensors broke every later count.)"""
    from dynopool_convert.conversion import convert_source

    size = (3, 160, 160)
    done = convert_source("timm:test_coatnet", {}, input_size=size, budget="0.5x", placement="before")
    assert done.plan.summary()["groups"] == 5 and done.plan.summary()["pinned"] == 0
    assert dc.count_flops(done.model, size) == done.fit.final_flops <= done.budget
