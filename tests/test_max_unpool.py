"""Models with ``nn.MaxUnpool2d`` / ``F.max_unpool2d``: fvcore counts them (torch's unpool size
check fails under jit tracing: ``flops._traceable_unpool``), the unpool moves no arithmetic (0
FLOPs), the max pool whose indices feed it is not a site, and they convert from the CLI with a
budget (the cost model follows a pool's ``(values, indices)`` pair) and export to TorchScript.

The models' source is this module (``module:factory``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynopool_convert as dc
from dynopool_cli.app import main
from dynopool_convert.dynopool import scale_parameters
from dynopool_convert.flops import count_flops, flops_by_module


class UnpoolNet(nn.Module):
    """benchmarks/e2e/custom/exotic.py's ``Unpool``: conv, max pool with indices, unpool, strided conv."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, i = self.pool(F.relu(self.c1(x)))
        return self.fc(F.relu(self.c2(self.unpool(y, i))).mean((2, 3)))


class LearnedBefore(nn.Module):
    """A learned stride before the pool/unpool pair (its size moves), the unpool's size read off
    the pooled map's shape, functional calls."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(in_chans, 8, 3, stride=2, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c0(x))
        y, i = F.max_pool2d(x, 2, return_indices=True)
        y = F.max_unpool2d(F.relu(self.c1(y)), i, 2, output_size=x.shape[-2:])
        return self.fc(y.mean((2, 3)))


def unpool_net(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return UnpoolNet(num_classes, in_chans)


def test_a_max_unpool_model_counts_its_other_ops_only():
    by = flops_by_module(UnpoolNet(), (3, 32, 32))
    assert by["unpool"] == 0 and by["pool"] == 0  # data movement, as fvcore counts it
    assert by[""] == by["c1"] + by["c2"] + by["fc"] == 8 * 27 * 32 * 32 + 16 * 72 * 16 * 16 + 16 * 10
    assert F._check_unpool_output_size.__module__ == "torch.nn.functional"  # torch's own again after the count


def test_a_functional_unpool_sized_off_a_shape_counts():
    model = LearnedBefore()
    assert count_flops(model, (3, 32, 32)) == 8 * 27 * 16 * 16 + 8 * 72 * 8 * 8 + 8 * 10
    x = torch.randn(1, 3, 32, 32)
    assert model(x).shape == (1, 10)  # outside the count, torch's check runs as before
    with pytest.raises(ValueError):
        F.max_unpool2d(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.long), 2, output_size=(9, 9))


def test_the_pool_feeding_an_unpool_is_not_a_site_and_the_cost_model_follows_the_pair():
    result = dc.convert(LearnedBefore(), (3, 32, 32))
    sites = {s.name: s for s in result.plan.sites}
    pool = next(s for name, s in sites.items() if "max_pool2d" in name)
    assert pool.status == "skipped" and "pooling indices" in pool.reason
    assert sites["c0"].status == "converted"
    cost = dc.CostModel(result.model, (3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # the cost model's count is fvcore's at other strides
        with torch.no_grad():
            for p in scale_parameters(result.model):
                p.copy_(torch.empty_like(p).uniform_(1.3, 2.9, generator=gen))
        assert round(float(cost().detach())) == count_flops(result.model, (3, 32, 32))


class UnpoolModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, i = self.pool(self.c0(x))
        return self.unpool(y, i).mean((2, 3))


def test_a_skipped_unpool_module_is_listed_as_a_pool():
    unpool = dc.convert(UnpoolModule(), (3, 16, 16)).plan.site("unpool")
    assert unpool.status == "skipped" and unpool.kind == "pool" and "MaxUnpool2d has no site handler" in unpool.reason


def test_convert_cli_with_a_budget(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", f"{__name__}:unpool_net", "--input-size", "32", "--budget", "0.7x",
              "--out", str(tmp_path / "c.pt")])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    assert "returns pooling indices" in out and "1 sites converted" in out
    loaded = dc.load_checkpoint(tmp_path / "c.pt", trust_source=True)
    assert count_flops(loaded.model, (3, 32, 32)) <= loaded.budget
    with pytest.raises(SystemExit) as exit_:  # torch.jit.trace meets the same unpool check
        main(["export", str(tmp_path / "c.pt"), "--trust-source", "--format", "torchscript",
              "--out", str(tmp_path / "m.ts")])
    assert exit_.value.code == 0, capsys.readouterr().err


class LearnedAround(nn.Module):
    """Learned strides before and after a pool/unpool pair whose unpool takes its default size,
    ``(n - 1) s - 2 p + k``: 2 * floor(n / 2), one pixel short of an odd map (the registry's
    geometry; without it the cost model read the unpool as keeping its input's size and could
    not follow the strided conv after it)."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.c0 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.c1 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c0(x))
        if self.functional:
            y, i = F.max_pool2d(x, 2, return_indices=True)
            x = F.max_unpool2d(y, i, 2)
        else:
            y, i = self.pool(x)
            x = self.unpool(y, i)
        return self.fc(F.relu(self.c1(x)).mean((2, 3)))


@pytest.mark.parametrize("functional", [False, True])
def test_a_default_size_unpool_between_learned_strides_is_followed_by_the_cost_model(functional):
    result = dc.convert(LearnedAround(functional), (3, 32, 32))
    assert result.plan.site("c0").status == result.plan.site("c1").status == "converted"
    cost = dc.CostModel(result.model, (3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):  # odd maps among them: the unpool drops their last row or column
        with torch.no_grad():
            for p in scale_parameters(result.model):
                p.copy_(torch.empty_like(p).uniform_(1.1, 2.9, generator=gen))
        assert round(float(cost().detach())) == count_flops(result.model, (3, 32, 32))


class FunctionalAround(nn.Module):
    """Functional convs (FLOPs outside any module: the cost model counts such calls alone) around
    a functional pool/unpool pair."""

    def __init__(self) -> None:
        super().__init__()
        self.w0 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1)
        self.w1 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, i = F.max_pool2d(F.conv2d(x, self.w0, stride=2, padding=1), 2, return_indices=True)
        return F.conv2d(F.max_unpool2d(y, i, 2), self.w1, stride=2, padding=1).mean((2, 3))


def test_unpool_among_calls_counted_alone():
    result = dc.convert(FunctionalAround(), (3, 32, 32))
    cost = dc.CostModel(result.model, (3, 32, 32))
    with torch.no_grad():
        for p in scale_parameters(result.model):
            p.copy_(torch.tensor([1.7, 2.3]))
    assert round(float(cost().detach())) == count_flops(result.model, (3, 32, 32))
