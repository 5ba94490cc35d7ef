"""Validation moves strides as training does (issue 19): each group on each axis to both ends of
[0.7, 1.4] (or one output step), then seeded random joint moves, forward and backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from _convert_models import WindowNet
from dynopool_convert import convert, dynopool_output_size, scale_parameters
from dynopool_convert.moves import MOVE_RANGE, axis_moves, joint_moves
from dynopool_convert.validate import joint_moves_problem

BOUNDS = (1 / 16, 2.0)


def test_axis_moves_go_to_the_ends_of_the_range_or_one_step():
    moves = dict(axis_moves((32, 20), (2.0, 2.0), BOUNDS))
    assert moves == {
        "smaller output height": (2.8, 2.0), "larger output height": (1.4, 2.0),
        "smaller output width": (2.0, 2.8), "larger output width": (2.0, 1.4),
    }
    # 4 px at stride 2 gives 2; x1.4 still gives 1.43 -> 1 but x0.7 gives 2.86 -> 3: one step is 4/3
    small = dict(axis_moves((4, 4), (2.0, 2.0), BOUNDS))
    assert dynopool_output_size(4, small["larger output height"][0]) == 3
    assert small["smaller output height"][0] == pytest.approx(2.8)
    # 2 px at stride 2 gives 1: no smaller output exists; the larger one is one step (stride 1)
    tiny = dict(axis_moves((2, 2), (2.0, 2.0), BOUNDS))
    assert "smaller output height" not in tiny and tiny["larger output height"] == (1.0, 2.0)


def test_axis_moves_respect_bounds_and_multiples():
    # at the upper stride bound no smaller output is possible
    assert [label for label, _ in axis_moves((64, 64), (16.0, 16.0), BOUNDS)] == ["larger output height", "larger output width"]
    # with a multiple of 4, one step is 4 px: 16 px at stride 2 gives 8, a step up is 12
    moves = dict(axis_moves((16, 16), (2.0, 2.0), BOUNDS, (4, 4)))
    assert dynopool_output_size(16, moves["larger output height"][0], 4) == 12
    assert dynopool_output_size(16, moves["smaller output height"][0], 4) == 4


def test_joint_moves_are_seeded_and_in_range():
    strides = {0: (2.0, 2.0), 3: (4.0, 1.5)}
    bounds = {0: BOUNDS, 3: BOUNDS}
    first, again = joint_moves(strides, bounds), joint_moves(strides, bounds)
    assert first == again and len(first) == 3
    for move in first:
        for gid, (sh, sw) in move.items():
            assert MOVE_RANGE[0] <= sh / strides[gid][0] <= MOVE_RANGE[1]
            assert MOVE_RANGE[0] <= sw / strides[gid][1] <= MOVE_RANGE[1]
    assert joint_moves(strides, bounds, seed=1) != first


class HiddenJoin(nn.Module):
    """Two stride-2 branches joined as token sequences: no tie can be seen, and moving both
    by the same pixel (the old validation) keeps them equal. Only an independent move breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 2, 1)
        self.b = nn.Conv2d(3, 8, 5, 2, 2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.cat([self.a(x).flatten(2), self.b(x).flatten(2)], 1).mean(2))


class NeedsFive(nn.Module):
    """An unpadded 5x5 conv after the pool: one pixel smaller passes, stride x1.4 does not."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(3, 4, 5)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(self.pool(x)).mean((2, 3)))


def test_a_join_only_an_independent_move_breaks_is_caught():
    r = convert(HiddenJoin(), input_size=(3, 16, 16))
    for name in ("a", "b"):
        site = r.plan.site(name)
        assert site.status != "converted" and "output height (stride" in site.reason and "breaks the forward" in site.reason


def test_the_largest_move_is_tried_not_only_one_pixel():
    r = convert(NeedsFive(), input_size=(3, 12, 12))
    pool = r.plan.site("pool")
    assert pool.status == "reverted" and pool.reason.startswith("smaller output height (stride 2.8x2)")


@pytest.mark.parametrize("model, size", [(WindowNet(), 32)], ids=["window_net"])
def test_after_conversion_random_joint_moves_never_break(model, size):
    r = convert(model, input_size=(3, size, size))
    x = torch.randn(2, 3, size, size)
    assert joint_moves_problem(r.model, x, n=10, seed=1, factors=MOVE_RANGE) == ""


def test_joint_moves_problem_reports_a_break():
    r = convert(HiddenJoin(), input_size=(3, 16, 16), validate=False)
    problem = joint_moves_problem(r.model, torch.randn(1, 3, 16, 16), n=5, seed=0, factors=MOVE_RANGE)
    assert problem.startswith("joint move") and "Sizes of tensors must match" in problem
    assert all(p.tolist() == [2.0, 2.0] for p in scale_parameters(r.model))  # strides restored
