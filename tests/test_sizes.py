"""Output sizes from the host copy of the stride (no device read per forward) and the trainer's
size schedule (sizes held between refreshes, distinct sizes counted, resume holds the same)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dynopool_convert import DynOPool, UserInputError
from dynopool_convert.dynopool import refresh_sizes
from dynopool_convert.training import finetune
from dynopool_convert.training.sizes import SizeSchedule
from dynopool_convert.training.upstream import convert, load_checkpoint, save_checkpoint
from dynopool_convert.training.zoo import small_cnn

SOURCE = "dynopool_convert.training.zoo:small_cnn"
BUILD = {"num_classes": 4, "in_chans": 3, "width": 4, "dropout": 0.0}
SIZE = (3, 16, 16)
DATA = "synthetic:classes=4,train=64,val=16"


class _CountReads:
    """Counts the device-to-host reads of DynOPool strides (each ``_set_host``)."""

    def __init__(self, monkeypatch):
        self.n = 0
        original = DynOPool._set_host

        def counting(module, values):
            self.n += 1
            original(module, values)

        monkeypatch.setattr(DynOPool, "_set_host", counting)


def _two_sites_sharing_one_stride() -> nn.Sequential:
    a = DynOPool(2.0)
    return nn.Sequential(a, DynOPool(a.stride), DynOPool(1.5))


def test_forward_reads_the_stride_only_after_it_changed(monkeypatch):
    reads = _CountReads(monkeypatch)
    pool = DynOPool(2.0)
    x = torch.randn(1, 1, 20, 20)
    for _ in range(3):
        assert pool(x).shape[-2:] == (10, 10)
    assert reads.n == 1
    with torch.no_grad():
        pool.stride.copy_(torch.tensor([4.0, 2.5]))
    assert pool(x).shape[-2:] == (5, 8) and reads.n == 2
    pool.clamp_()  # in-place: bumps the version counter, re-read once
    pool(x)
    pool(x)
    assert reads.n == 3


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_optimiser_steps_and_state_loading_change_the_sizes(opt):
    pool = DynOPool(2.0)
    x = torch.randn(1, 1, 40, 40, requires_grad=True)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=2.0), "adamw": lambda p: torch.optim.AdamW(p, lr=0.6, foreach=False)}
    optimizer = make[opt](pool.parameters())
    pool(x).sum().backward()
    pool.stride.grad = torch.tensor([-1.0, -1.0])  # a large step: the stride grows
    optimizer.step()
    assert pool(x).shape[-2:] == pool.output_size((40, 40)) != (20, 20)
    pool.load_state_dict({"stride": torch.tensor([4.0, 4.0])})
    assert pool(x).shape[-2:] == (10, 10)


def test_edits_through_data_need_refresh_sizes():
    model = _two_sites_sharing_one_stride()
    x = torch.randn(1, 1, 30, 30)
    assert model(x).shape[-2:] == (5, 5)  # 30 -> 15 -> 8 (7.5 rounds half to even) -> 5
    model[0].stride.data.fill_(3.0)  # .data bypasses the version counter
    assert model(x).shape[-2:] == (5, 5)
    refresh_sizes(model)
    assert model(x).shape[-2:] == (2, 2)  # 30 -> 10 -> 3 -> 2
    model[0].stride.data = torch.tensor([6.0, 6.0])  # a new storage is noticed
    assert model[0].output_size((30, 30)) == (5, 5)


def test_refresh_sizes_is_one_transfer_for_all_groups(monkeypatch):
    model = _two_sites_sharing_one_stride()
    calls = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(self.shape) or real_cpu(self, *a, **k))
    refresh_sizes(model)
    assert calls == [torch.Size([2, 2])]  # two groups, stacked
    assert [m.host_stride() for m in model] == [(2.0, 2.0), (2.0, 2.0), (1.5, 1.5)]


def test_held_sizes_change_only_at_refresh_and_copies_re_read():
    pool = DynOPool(2.0)
    x = torch.randn(1, 1, 20, 20)
    refresh_sizes(pool, hold=True)
    with torch.no_grad():
        pool.stride.fill_(4.0)
    assert pool(x).shape[-2:] == (10, 10)  # held
    clone = copy.deepcopy(pool)  # a copy (the trainer's budget projection) sees the real strides
    assert clone(x).shape[-2:] == (5, 5)
    refresh_sizes(pool)
    assert pool(x).shape[-2:] == (5, 5)
    with torch.no_grad():
        pool.stride.fill_(2.0)
    assert pool(x).shape[-2:] == (5, 5)
    refresh_sizes(pool, hold=False)
    with torch.no_grad():
        pool.stride.fill_(10.0)
    assert pool(x).shape[-2:] == (2, 2)


def test_schedule_refreshes_every_k_steps_and_counts_sizes():
    model = nn.Sequential(DynOPool(2.0))
    sched = SizeSchedule(model, every=3, device=torch.device("cpu"), strides_learn=True)
    x = torch.randn(1, 1, 24, 24)
    used = []
    for step in range(1, 8):
        with torch.no_grad():
            model[0].stride.fill_(2.0 + 0.5 * step)  # every step would give a new size
        used.append(model(x).shape[-1])
        sched.after_step(step)
    # refreshed after steps 3 and 6: sizes of strides 2.0 (held), 3.5, 5.0
    assert used == [12, 12, 12, 7, 7, 7, 5]
    assert sched.distinct == 3
    assert sched.state()["held"] == [[5.0, 5.0]]
    sched.close()
    assert model(x).shape[-1] == round(24 / 5.5) and not model[0].hold_sizes


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    result = convert(small_cnn(**BUILD), input_size=SIZE)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, result.model, result.plan, SOURCE, build_args=BUILD, input_size=SIZE, budget=None)
    return path


def _train(ckpt: Path, out: Path, every: int, overrides: dict | None = None, budget: str | None = None, **extra):
    train = {"epochs": 2, "batch_size": 8, "lr": 0.05, "scale_lr": 0.5, "log_every": 4, "device": "cpu",
             "size_refresh_every": every, "size_jitter": 0, "size_search": False, **(overrides or {})}
    top = {"data": DATA, "train": train, **({"budget": budget} if budget else {})}
    return finetune(ckpt, out, trust_source=True, overrides=top, **extra)


def test_trainer_records_distinct_sizes_and_resumes_with_held_sizes(tiny_ckpt, tmp_path):
    full = _train(tiny_ckpt, tmp_path / "full", every=5)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [isinstance(r["distinct_sizes"], int) and r["distinct_sizes"] >= 2 for r in epochs] == [True, True]
    assert load_checkpoint(tmp_path / "full" / "last.pt", trust_source=True).training["size_log"]["held"]
    # stopped at step 7 (between refreshes at 5 and 10) and resumed: the same trajectory
    part = _train(tiny_ckpt, tmp_path / "part", every=5, stop_after_steps=7)
    assert not part.completed
    resumed = _train(tiny_ckpt, tmp_path / "part", every=5, resume=True)
    assert resumed.completed and resumed.strides == full.strides


def test_compile_and_export_use_the_host_copy_without_graph_breaks():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), DynOPool(1.7), nn.Conv2d(4, 4, 3))
    x = torch.randn(2, 3, 20, 20)
    model(x)  # takes the host copy
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0
    compiled = torch.compile(model, backend="eager")
    assert compiled(x).shape[-2:] == (9, 9)  # 18 -> round(18 / 1.7) = 11 -> 9
    with torch.no_grad():
        model[1].stride.fill_(3.0)
    refresh_sizes(model)
    assert compiled(x).shape[-2:] == (4, 4)  # the guard on the host copy recompiles: 18 -> 6 -> 4
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_refresh_every_needs_no_jitter_and_releases_the_hold_for_the_search(tiny_ckpt, tmp_path):
    with pytest.raises(UserInputError, match="size_jitter"):
        _train(tiny_ckpt, tmp_path / "bad", every=5, overrides={"size_jitter": 1})
    # the size search weighs sizes against FLOPs: it runs under a budget (1G: no pressure here)
    res = _train(tiny_ckpt, tmp_path / "search", every=3, overrides={"size_search": True, "settle": 0.5}, budget="1G")
    rows = [json.loads(line) for line in (tmp_path / "search" / "metrics.jsonl").read_text().splitlines()]
    search = [r for r in rows if r["kind"] == "search"]
    assert res.completed and len(search) == 1
    # the search set strides and measured their sizes with the hold lifted: the kept strides give
    # the sizes it reports (with the hold in place it would have measured the held sizes)
    from dynopool_convert.training.group_sizes import GroupGeometry

    fresh = load_checkpoint(tiny_ckpt, trust_source=True).model
    assert GroupGeometry(fresh, SIZE).sizes_at(search[0]["strides"]) == [tuple(s) for s in search[0]["sizes"]]
    assert [list(s) for s in res.strides] == [list(s) for s in search[0]["strides"]]
