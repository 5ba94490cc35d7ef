"""The size schedule of fine-tuning: group sizes, jitter, the held-out search, and the trainer's use of them."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dynopool_convert import build_model, convert
from dynopool_convert.cost_model import CostModel
from dynopool_convert.training import finetune
from dynopool_convert.training.trainer import TrainCallbacks
from dynopool_convert.training.data import HOLDOUT_MIN, holdout_cap
from dynopool_convert.training.group_sizes import GroupGeometry
from dynopool_convert.training.size_control import search_has_choices
from dynopool_convert.training.size_jitter import SizeJitter
from dynopool_convert.training.size_search import search_sizes
from dynopool_convert.training.upstream import count_flops, load_checkpoint, save_checkpoint
from dynopool_convert.training.zoo import small_cnn

SIZE = (1, 28, 28)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


@pytest.fixture()
def converted() -> nn.Module:
    return convert(_net(), input_size=SIZE, input_site=True).model


def test_input_site_is_a_group_at_stride_one(converted):
    geo = GroupGeometry(converted, SIZE)
    assert geo.strides() == [(1.0, 1.0), (2.0, 2.0), (2.0, 2.0)]
    assert geo.measure() == ([(28, 28), (28, 28), (14, 14)], [(28, 28), (14, 14), (7, 7)])


def test_set_sizes_follows_the_groups_before(converted):
    geo = GroupGeometry(converted, SIZE)
    assert geo.set_sizes([(20, 24), (9, 13), (5, 4)])
    assert geo.measure()[1] == [(20, 24), (9, 13), (5, 4)]
    assert not geo.set_sizes([(60, 60), (9, 13), (5, 4)])  # r would exceed its bound of 2


def test_set_sizes_under_the_exact_placement():
    """A DynResize resizes H -> H * s0 / s (its size is what the kept op reads): the strides for
    wanted sizes carry its base s0, and the model's outputs follow."""
    model = convert(_net(), input_size=SIZE, input_site=True, placement="exact").model
    geo = GroupGeometry(model, SIZE)
    assert geo.measure() == ([(28, 28), (28, 28), (14, 14)], [(28, 28), (28, 28), (14, 14)])
    assert geo.set_sizes([(24, 26), (20, 25), (9, 11)])
    assert geo.measure()[1] == [(24, 26), (20, 25), (9, 11)]
    h, w = geo.strides()[1]
    assert abs(h - 2.0 * 24 / 20) < 1e-5 and abs(w - 2.0 * 26 / 25) < 1e-5


def test_jitter_moves_sizes_within_pixels_and_restores_strides(converted):
    geo = GroupGeometry(converted, SIZE)
    jitter = SizeJitter(geo, pixels=1, seed=0)
    before = [p.detach().clone() for p in geo.params]
    base = geo.measure()[1]
    moved = set()
    for step in range(20):
        with jitter.step(step):
            sizes = geo.measure()[1]
        moved.add(tuple(sizes))
        # the input site moves by at most one pixel per axis (later groups follow the earlier ones)
        assert all(abs(a - b) <= 1 for a, b in zip(sizes[0], base[0]))
        assert all(torch.equal(p, q) for p, q in zip(geo.params, before))
    assert len(moved) > 3


def test_jitter_draws_depend_on_the_step_only(converted):
    geo = GroupGeometry(converted, SIZE)
    seen = []
    for _ in range(2):
        jitter = SizeJitter(geo, pixels=2, seed=5)
        with jitter.step(7):
            seen.append(geo.measure()[1])
    assert seen[0] == seen[1]


def test_search_finds_the_best_allocation_within_budget(converted):
    geo = GroupGeometry(converted, SIZE)
    cost = CostModel(converted, SIZE)
    budget = int(cost.flops(geo.strides()))
    target = [(24, 28), (16, 12), (8, 6)]  # a held-out score that peaks here, if affordable

    noise = torch.randn(400, generator=torch.Generator().manual_seed(0))

    def evaluate():  # per-image losses that grow with the distance to the target, plus per-image noise
        sizes = geo.measure()[1]
        distance = float(sum(abs(a - b) for s, t in zip(sizes, target) for a, b in zip(s, t)))
        return distance + 0.5 * noise, torch.ones(400)

    res = search_sizes(geo, cost.flops, budget, evaluate, geo.strides(), rounds=30, trades=40, seed=0)
    assert res.flops <= budget and int(cost.flops(geo.strides())) == res.flops
    assert geo.measure()[1] == res.sizes  # the model is left at the chosen sizes
    assert res.loss < 8.0 - 1.0  # started 8 pixels away from the target
    assert all(e["flops"] <= budget for e in res.evaluated)
    assert count_flops(converted, SIZE) <= budget


def test_search_keeps_the_initial_allocation_without_evidence(converted):
    geo = GroupGeometry(converted, SIZE)
    cost = CostModel(converted, SIZE)
    initial = geo.strides()
    budget = int(cost.flops(initial))
    gen = torch.Generator().manual_seed(1)

    def evaluate():  # pure noise: no allocation is really better
        return torch.rand(300, generator=gen), torch.ones(300)

    others = {"learned": [(1.2, 1.0), (2.5, 2.0), (2.0, 2.0)]}
    res = search_sizes(geo, cost.flops, budget, evaluate, initial, others, rounds=4, seed=0)
    assert res.start == "initial" and res.sizes == [(28, 28), (14, 14), (7, 7)]
    assert len(res.evaluated) > 10  # it did look


def test_paired_z_sees_a_consistent_small_gain():
    from dynopool_convert.training.size_search import paired_z

    base = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 3
    assert paired_z(base - 0.05, base) > 10  # the same images, every one a bit better
    assert paired_z(base + 0.05, base) < -10
    assert abs(paired_z(base, base)) == 0.0


TINY_SIZE = (3, 16, 16)


class Recorder(TrainCallbacks):
    """What a run reports: its messages, its start, the size search's progress."""

    def __init__(self) -> None:
        self.messages, self.started, self.scored = [], [], []

    def on_message(self, text):
        self.messages.append(text)

    def on_start(self, info):
        self.started.append(info)

    def on_search(self, n):
        self.scored.append(n)


def _tiny_checkpoint(tmp_path, budget_frac: float = 0.9, placement: str = "before"):
    """A converted small_cnn (4 classes, width 4, 16 px) saved with ``budget_frac`` of its FLOPs."""
    torch.manual_seed(0)
    build = {"num_classes": 4, "in_chans": 3, "width": 4}
    result = convert(small_cnn(**build), input_size=TINY_SIZE, placement=placement)
    budget = int(budget_frac * count_flops(result.model, TINY_SIZE))
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, result.model, result.plan, "dynopool_convert.training.zoo:small_cnn", build_args=build,
                    input_size=TINY_SIZE, budget=budget)
    return ckpt, result, budget


def test_finetune_searches_then_holds_the_sizes(tmp_path):
    ckpt, _, budget = _tiny_checkpoint(tmp_path)
    out = tmp_path / "run"
    res = finetune(ckpt, out, trust_source=True, overrides={"data": "synthetic:classes=4,train=100,val=16", "train": {
        "steps": 10, "batch_size": 10, "scale_lr": 0.05, "device": "cpu", "log_every": 1, "size_search": True}})
    assert res.completed and res.steps == 10
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    search = [r for r in rows if r["kind"] == "search"]
    assert len(search) == 1 and search[0]["step"] == 7 and search[0]["flops"] <= budget
    # settled: every step after the search trains at the searched strides
    after = [r["r"] for r in rows if r["kind"] == "step" and r["step"] > 7]
    expected = [[round(1.0 / v, 6) for v in s] for s in search[0]["strides"]]
    assert after and all(r == expected for r in after)
    # 10 of the 100 training images were held out: 90 // 10 = 9 steps per epoch
    assert [r["step"] for r in rows if r["kind"] == "epoch"][0] == 9
    saved = load_checkpoint(out / "last.pt", trust_source=True)
    assert count_flops(saved.model, TINY_SIZE) <= budget
    assert saved.training["sizes"]["result"]["sizes"] == search[0]["sizes"]


def test_budget_fit_lowers_the_input_resolution_alone_first():
    from dynopool_convert.budget import fit_to_budget

    model = convert(_net(), input_size=SIZE, input_site=True).model
    full = count_flops(model, SIZE)
    fit = fit_to_budget(model, full // 2, SIZE)
    assert fit.method == "input" and fit.final_flops <= full // 2
    sizes = GroupGeometry(model, SIZE).measure()[1]
    h = sizes[0][0]
    assert h < 28 and sizes[1:] == [(round(h / 2), round(h / 2)), (round(round(h / 2) / 2),) * 2]
    # every other group kept its stride
    assert [tuple(p.detach().tolist()) for p in GroupGeometry(model, SIZE).params[1:]] == [(2.0, 2.0), (2.0, 2.0)]


def test_search_starts_include_each_group_shrunk_alone(converted):
    from dynopool_convert.training.size_control import SizeControl

    cost = CostModel(converted, SIZE)
    full = int(cost.flops(GroupGeometry(converted, SIZE).strides()))
    control = SizeControl(converted, SIZE, jitter=0, search=True, settle=0.3, total_steps=10, seed=0)
    starts = control._one_group_fits(cost.flops, full * 2 // 3)
    assert set(starts) == {"only group 0 shrunk", "only group 1 shrunk"}  # the last group alone cannot get there
    for strides in starts.values():
        assert cost.flops(strides) <= full * 2 // 3


def test_a_model_over_its_budget_is_fitted_before_the_first_step(tmp_path):
    """Strides not learned (the default): the checkpoint's model, over its budget, is fitted to it
    first, so that every step trains within the budget (not only the steps after the search)."""
    ckpt, _, budget = _tiny_checkpoint(tmp_path, budget_frac=0.7)
    rec = Recorder()
    finetune(ckpt, tmp_path / "run", trust_source=True, callbacks=rec, overrides={
        "data": "synthetic:classes=4,train=100,val=16", "train": {"steps": 6, "batch_size": 10, "device": "cpu",
                                                                   "log_every": 1}})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 6 and all(r["flops"] <= budget for r in steps)
    assert sum("over its budget: fitted to" in m for m in rec.messages) == 1


def test_held_out_images_train_again_after_the_search_and_resume_is_exact(tmp_path):
    ckpt, _, _ = _tiny_checkpoint(tmp_path)
    ov = {"data": "synthetic:classes=4,train=100,val=16", "train": {
        "steps": 50, "batch_size": 10, "device": "cpu", "log_every": 1, "size_search": True}}
    rec = Recorder()
    full = finetune(ckpt, tmp_path / "a", trust_source=True, overrides=ov, callbacks=rec)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "search"] == [35]  # epoch 3 (steps 28-36 on 90 images)
    search = next(r for r in rows if r["kind"] == "search")
    assert rec.scored == list(range(1, search["evaluations"] + 1)) and len(rec.scored) > 1  # progress per allocation
    # 9 steps per epoch on the 90 kept images, 10 from epoch 4 on (all 100)
    assert [r["step"] for r in rows if r["kind"] == "epoch"] == [9, 18, 27, 36, 46, 50]
    assert any("10 held-out images train again from epoch 4" in m for m in rec.messages)
    # interrupted after the rejoin, mid-epoch, then resumed: the same run bit for bit
    part = finetune(ckpt, tmp_path / "b", trust_source=True, overrides=ov, stop_after_steps=41)
    assert not part.completed
    rest = finetune(None, tmp_path / "b", resume=True, trust_source=True)
    assert rest.completed and rest.strides == full.strides
    sa = load_checkpoint(tmp_path / "a" / "last.pt", trust_source=True).model.state_dict()
    sb = load_checkpoint(tmp_path / "b" / "last.pt", trust_source=True).model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetune_exact_trains_and_saves_at_the_searched_sizes(tmp_path):
    """Placement exact, the default schedule (no stride learning, held-out search): the sizes the
    search keeps are the sizes trained after it and saved."""
    ckpt, result, _ = _tiny_checkpoint(tmp_path, budget_frac=1.0, placement="exact")
    size = TINY_SIZE
    initial = GroupGeometry(result.model, size).measure()[1]
    out = tmp_path / "run"
    finetune(ckpt, out, trust_source=True, overrides={"data": "synthetic:classes=4,train=100,val=16", "train": {
        "steps": 10, "batch_size": 10, "device": "cpu", "log_every": 1, "size_search": True}})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    search = [r for r in rows if r["kind"] == "search"]
    assert len(search) == 1 and search[0]["evaluations"] > 1
    saved = load_checkpoint(out / "last.pt", trust_source=True)
    sizes = GroupGeometry(saved.model, size).measure()[1]
    assert sizes == [tuple(s) for s in search[0]["sizes"]]
    if search[0]["start"] == "initial" and sizes == initial:  # nothing moved: the converted strides, exactly
        assert GroupGeometry(saved.model, size).strides() == [(2.0, 2.0), (2.0, 2.0)]


def test_sizes_that_break_the_forward_are_not_candidates():
    """Under ``exact`` a kept 2x2 pool fed a 1x1 map fails (DenseNet's transitions at 64 px did,
    inside finetune's search): set_sizes says False, and the search skips those allocations."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    size = (1, 8, 8)
    model = convert(net, input_size=size, placement="exact").model
    geo = GroupGeometry(model, size)
    assert geo.measure()[1] == [(8, 8), (4, 4)]  # what each kept pool reads
    assert not geo.set_sizes([(8, 8), (1, 1)])  # the second pool would read 1x1
    assert geo.set_sizes([(8, 8), (2, 2)])
    cost = CostModel(model, size)
    noise = 0.01 * torch.randn(50, generator=torch.Generator().manual_seed(0))

    def evaluate():  # a held-out score that prefers the smallest second map
        h, w = geo.measure()[1][1]
        return h + w + noise, torch.ones(50)

    start = geo.strides()
    res = search_sizes(geo, cost.flops, int(cost.flops(start)), evaluate, start, rounds=3, step_fraction=0.5,
                       others={"too small": [(2.0, 2.0), (16.0, 16.0)]})
    assert res.sizes == [(8, 8), (2, 2)]  # every smaller second map breaks the forward
    assert model(torch.zeros(1, *size)).shape == (1, 3)  # left at sizes that run


def test_a_short_run_holds_out_no_more_than_it_trains_on(tmp_path):
    """With the size search on, a run of a few steps holds out max(HOLDOUT_MIN, steps x batch) images, not 10% of a large
    training set: the search scores every allocation on all of them."""
    assert holdout_cap(5000, None, 64) == 5000
    assert holdout_cap(5000, 3, 8) == HOLDOUT_MIN
    assert holdout_cap(5000, 100, 32) == 3200
    assert holdout_cap(1000, 100, 32) == 1000
    ckpt, _, _ = _tiny_checkpoint(tmp_path)
    rec = Recorder()
    finetune(ckpt, tmp_path / "run", trust_source=True, callbacks=rec, overrides={
        "data": "synthetic:classes=4,train=4000,val=16", "train": {"steps": 3, "batch_size": 4, "device": "cpu", "size_search": True}})
    assert any(m.startswith(f"size search on {HOLDOUT_MIN} held-out training images") for m in rec.messages), rec.messages


def test_no_images_are_held_out_when_only_the_start_fits_the_budget(tmp_path):
    """MobileNetV3 at 32 px, converted `exact`, at a budget equal to its FLOPs: every other
    allocation pays for a resize that costs more than the pixels it saves, so the search (asked
    for) would score the start alone; the run holds out nothing and trains on every image."""
    size, build = (3, 32, 32), {"num_classes": 4}
    result = convert(build_model("timm:mobilenetv3_small_050", build), input_size=size, placement="exact")
    budget = count_flops(result.model, size)
    cost = CostModel(result.model, size)
    assert not search_has_choices(result.model, size, cost.flops, budget)
    assert search_has_choices(result.model, size, cost.flops, int(0.9 * budget))
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, result.model, result.plan, "timm:mobilenetv3_small_050", build_args=build, input_size=size,
                    budget=budget)
    rec = Recorder()
    finetune(ckpt, tmp_path / "run", callbacks=rec, overrides={
        "data": "synthetic:classes=4,train=40,val=8", "train": {"steps": 4, "batch_size": 10, "device": "cpu", "size_search": True}})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["kind"] == "search"] and rec.started[0]["train_size"] == 40
    assert any(m.startswith("no size search: no allocation but the starting one fits") for m in rec.messages), rec.messages


def test_by_default_no_images_are_held_out_and_the_fitted_sizes_train(tmp_path):
    """The default schedule (docs/RESULTS.md §6.5): no search, no held-out split; the sizes the
    budget fit gave are the sizes trained and saved."""
    ckpt, result, budget = _tiny_checkpoint(tmp_path, budget_frac=0.8)
    rec = Recorder()
    finetune(ckpt, tmp_path / "run", trust_source=True, callbacks=rec, overrides={
        "data": "synthetic:classes=4,train=100,val=16", "train": {"steps": 6, "batch_size": 10, "device": "cpu"}})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["kind"] == "search"] and rec.started[0]["train_size"] == 100
    sizes = {tuple(map(tuple, r["r"])) for r in rows if r["kind"] == "step"}
    assert len(sizes) == 1  # held where the fit put them
    assert all(r["flops"] <= budget for r in rows if r["kind"] == "step")
