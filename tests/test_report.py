"""The report as data and in every format, from hand-made stand-ins of a converted model."""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from _report_fixtures import TinyConverted, tiny_plan, tiny_training
from dynopool_convert import DynOPool
from dynopool_convert.report import FORMAT_VERSION, build_report, figures, render, to_rich, write_figures
from dynopool_convert.report.flops import count_flops, flops_by_module
from dynopool_convert.report.receptive_field import dynopool_read_span
from dynopool_convert.report.schema import FLOPS, GROUP, SITE, STAGE, TOP_LEVEL, check_report

DOCS = Path(__file__).resolve().parents[1] / "docs" / "REPORT.md"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def converted() -> dict:
    """Report of the tiny network as converted (every stride at its initial 2)."""
    return build_report(TinyConverted(), tiny_plan(), source="tests:tiny", input_size=(3, 32, 32), budget=250_000,
                        extra={"flops_original": 123_456})


@pytest.fixture(scope="module")
def moved() -> dict:
    """Report after the test moves the scale factors by hand, with a training history."""
    model = TinyConverted()
    with torch.no_grad():
        model.pool.stride.copy_(torch.tensor([1.6, 2.5]))
        model.block_conv1_pool.stride.copy_(torch.tensor([3.0, 1.5]))  # shared with block_down_pool
    return build_report(model, tiny_plan(), source="tests:tiny", input_size=(3, 32, 32), budget=100_000,
                        training=tiny_training(), extra={"flops_original": 123_456, "note": "hand-moved"})


def test_schema_of_both_reports(converted, moved):
    assert converted["format_version"] == FORMAT_VERSION == 1
    assert check_report(converted) == []
    assert check_report(moved) == []


def test_schema_check_catches_departures(converted):
    bad = json.loads(json.dumps(converted))
    bad["sites"][0]["r"] = [0.5]
    del bad["groups"][0]["r"]
    bad["flops"]["current"] = "many"
    errors = check_report(bad)
    assert any("sites[0].r" in e for e in errors)
    assert any("groups[0]: missing 'r'" in e for e in errors)
    assert any("flops.current" in e for e in errors)


def test_docs_describe_every_field():
    text = DOCS.read_text()
    assert re.search(r"format_version.*\b1\b", text)
    for table in (TOP_LEVEL, FLOPS, SITE, GROUP, STAGE):
        for field in table:
            assert f"`{field}`" in text, f"docs/REPORT.md does not describe `{field}`"


def test_sites_as_converted(converted):
    sites = {s["name"]: s for s in converted["sites"]}
    stem = sites["stem.conv"]
    assert (stem["module"], stem["r"], stem["r_init"], stem["input_size"], stem["output_size"]) == ("stem_pool", [0.5, 0.5], [0.5, 0.5], [32, 32], [16, 16])
    assert sites["block.down"]["module"] == "block_down_pool"  # matched by name prefix
    assert sites["pool"]["receptive_field"] == [12.0, 12.0]
    late = sites["late_conv"]
    assert late["status"] == "reverted" and late["r"] is None and late["reason"].startswith("validation")
    assert late["output_size"] == [2, 2] and late["receptive_field"] == [48.0, 48.0]
    assert converted["flops"]["converted"] == converted["flops"]["current"]
    assert converted["flops"]["original"] == 123_456
    assert converted["flops"]["within_budget"] is (converted["flops"]["current"] <= 250_000)


def test_site_feature_map_pool_vs_conv_before():
    # a pool site is its DynOPool's output even when one conv reads it; a conv site converted
    # with placement "before" is the output of the stride-1 conv after its DynOPool
    model = torch.nn.Sequential(DynOPool(2.0), torch.nn.Conv2d(3, 4, 3, 1, 1))
    for kind, placement, expected in (("pool", None, [2.0, 2.0]), ("conv", "before", [6.0, 6.0])):
        plan = {"sites": [{"name": "0", "op": "op", "kind": kind, "status": "converted", "group": 0,
                           "placement": placement, "stride_init": [2.0, 2.0]}],
                "groups": [{"id": 0, "sites": ["0"]}]}
        report = build_report(model, plan, source=None, input_size=(3, 16, 16))
        assert report["sites"][0]["receptive_field"] == expected, kind


def test_flops_count_convs_exactly():
    per = flops_by_module(TinyConverted(), (3, 32, 32))
    # MACs of each conv at its output size: c_in * c_out * k * k * H' * W'
    assert per["stem_conv"] == 3 * 8 * 9 * 16 * 16
    assert per["body"] == 8 * 8 * 9 * 16 * 16
    assert per["block_conv1"] == 8 * 16 * 9 * 4 * 4
    assert per["block_down"] == 8 * 16 * 4 * 4
    assert per["late_conv"] == 16 * 16 * 9 * 2 * 2
    assert per[""] == count_flops(TinyConverted(), (3, 32, 32))


def test_flops_that_depend_on_each_site(converted):
    sites = {s["name"]: s for s in converted["sites"]}
    per = flops_by_module(TinyConverted(), (3, 32, 32))
    assert per["se_pool"] > 0 and per["head"] > 0 and per["body"] > 0
    # the pool's size reaches the block's convs, the SE pool (its input) and the late conv,
    # not the body before it nor the head after the global pool
    # (DynOPool's own cost: per[...] of its module, 0 in the stand-in counter)
    block = 8 * 16 * 9 * 4 * 4 + 8 * 16 * 4 * 4 + per["block_conv1_pool"] + per["block_down_pool"]
    late = 16 * 16 * 9 * 2 * 2
    assert sites["pool"]["flops_dependent"] == per["pool"] + block + per["se_pool"] + late
    assert sites["block.down"]["flops_dependent"] == per["block_down_pool"] + per["block_down"] + per["se_pool"] + late
    # the stem moves everything but the SE fc and head (1x1 / flat), and the FLOPs of plain
    # function calls (here the final F.adaptive_avg_pool2d), which are not attributed
    in_functions = per[""] - sum(v for k, v in per.items() if k)
    assert in_functions == 16 * 2 * 2
    assert sites["stem.conv"]["flops_dependent"] == converted["flops"]["current"] - per["head"] - per["se_fc"] - in_functions
    assert sites["stem.conv"]["flops_dependent"] >= per["stem_pool"] + per["stem_conv"]
    groups = {g["id"]: g for g in converted["groups"]}
    assert groups[2]["sites"] == ["block.conv1", "block.down"]
    assert groups[2]["flops_dependent"] == block + per["se_pool"] + late
    assert sites["late_conv"]["flops_dependent"] is None


def test_moved_strides(moved):
    sites = {s["name"]: s for s in moved["sites"]}
    pool = sites["pool"]
    assert pool["r"] == [1 / 1.600000023841858, 1 / 2.5]  # full precision of the float32 parameter
    assert pool["stride"] == pytest.approx([1.6, 2.5])
    assert pool["r_init"] == [0.5, 0.5] and pool["output_size_init"] == [8, 8]
    for s in moved["sites"]:
        if s["r"] is not None:  # output = round(r * input) within the bounds (at least 1)
            assert s["output_size"] == [max(1, round(r * n)) for r, n in zip(s["r"], s["input_size"])]
    assert pool["input_size"] == [16, 16] and pool["output_size"] == [10, 6]
    # receptive field through the moved pool: 10 + (span - 1) * 2 per axis (jump 2 before it)
    assert pool["receptive_field"] == [10 + (dynopool_read_span(16, 10) - 1) * 2, 10 + (dynopool_read_span(16, 6) - 1) * 2]
    assert pool["receptive_field"] != pool["receptive_field_init"]
    conv1, down = sites["block.conv1"], sites["block.down"]
    assert conv1["r"] == down["r"] == pytest.approx([1 / 3, 1 / 1.5])  # tied group
    assert conv1["output_size"] == down["output_size"] == [3, 4]
    group = next(g for g in moved["groups"] if g["id"] == 2)
    assert group["r"] == conv1["r"] and group["r_init"] == [0.5, 0.5]
    assert moved["flops"]["current"] != moved["flops"]["converted"]
    model = TinyConverted()
    assert moved["flops"]["converted"] == count_flops(model, (3, 32, 32))
    assert [st["size"] for st in moved["stages"]] == [[32, 32], [16, 16], [10, 6], [3, 4]]
    assert [st["size_init"] for st in moved["stages"]] == [[32, 32], [16, 16], [8, 8], [4, 4]]


def test_training_summary_and_history(moved, converted):
    # the finetune helper's layout: scalars of training and training["progress"], no state
    assert moved["training"] == {"world_size": 1, "total_steps": 400, "epoch": 4, "step": 400, "step_in_epoch": 0,
                                 "best_metric": 0.40, "best_epoch": 2}
    assert moved["accuracy"] == {
        "train_acc": {"last": pytest.approx(0.35), "best": pytest.approx(0.35)},
        "val_acc": {"last": pytest.approx(0.38), "best": pytest.approx(0.40)},
    }
    history = moved["history"]
    assert len(history) == 4 and history[0]["val_loss"] == 2.1
    # r lists (scale_parameters order: stem, pool, block) are keyed by group id
    assert history[1]["r"] == {"0": [0.52, 0.47], "1": [0.5, 0.55], "2": [0.5, 0.5]}
    assert moved["extra"] == {"note": "hand-moved"}
    assert converted["history"] is None and converted["accuracy"] is None and converted["training"] is None


def test_non_finite_values_become_null():
    training = {"history": [{"epoch": 0, "loss": float("nan"), "val_acc": torch.tensor(float("inf")), "r": {"0": [0.5, 0.5]}}]}
    report = build_report(TinyConverted(), tiny_plan(), source=None, input_size=(3, 32, 32), training=training)
    assert report["history"][0]["loss"] is None and report["history"][0]["val_acc"] is None
    json.loads(render(report, "json"))  # strict JSON (no NaN)


def test_history_under_its_own_key():
    training = {"epoch": 2, "history": [{"step": s, "r": {"1": [0.5, 0.4 + s / 100]}, "top1": s / 10} for s in (10, 20)]}
    report = build_report(TinyConverted(), tiny_plan(), source=None, input_size=(3, 32, 32), training=training)
    assert report["history"][1]["r"] == {"1": [0.5, 0.4 + 20 / 100]}
    assert report["accuracy"] == {"top1": {"last": 2.0, "best": 2.0}} and report["training"] == {"epoch": 2}
    assert set(figures(report)) == {"shapes.png", "scale_factors.png"}


def test_input_size_override_drops_budget_verdict():
    report = build_report(TinyConverted(), tiny_plan(), source=None, input_size=(3, 48, 40), budget=10,
                          reference_input_size=(3, 32, 32))
    assert report["flops"]["within_budget"] is None
    assert report["input_size"] == [3, 48, 40] and report["reference_input_size"] == [3, 32, 32]
    assert report["sites"][0]["output_size"] == [24, 20]
    assert report["model"] == "TinyConverted"


@pytest.mark.parametrize("which", ["converted", "moved"])
def test_json_and_yaml_carry_the_same_data(which, request):
    report = request.getfixturevalue(which)
    from_json = json.loads(render(report, "json"))
    from_yaml = yaml.safe_load(render(report, "yaml"))
    assert from_json == from_yaml == report
    assert check_report(from_yaml) == []


@pytest.mark.parametrize("which", ["converted", "moved"])
def test_markdown(which, request):
    report = request.getfixturevalue(which)
    text = render(report, "md")
    assert text.startswith("# dynopool report: tiny")
    rows = [line for line in text.splitlines() if line.startswith("| pool |")]
    assert len(rows) == 1
    expected_r = "0.625, 0.4" if which == "moved" else "0.5, 0.5"
    assert f"| {expected_r} |" in rows[0]
    assert "`late_conv` reverted: validation" in text
    assert "- block.conv1 and block.down tied: joined by add" in text
    assert ("## History" in text) is (which == "moved")


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.srcs, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href")]

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_html_is_self_contained_with_figures(moved):
    page = render(moved, "html")
    parser = _Tags()
    parser.feed(page)
    assert parser.errors == [] and parser.stack == []
    assert len(parser.srcs) == 2 and all(src.startswith("data:image/png;base64,") for src in parser.srcs)
    assert all(base64.b64decode(src.split(",", 1)[1]).startswith(PNG) for src in parser.srcs)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "block.conv1, block.down" in page


def test_figures(converted, moved, tmp_path):
    assert set(figures(converted)) == {"shapes.png"}  # no history, no scale-factor plot
    paths = write_figures(moved, tmp_path / "figs")
    assert sorted(p.name for p in paths) == ["scale_factors.png", "shapes.png"]
    for p in paths:
        assert p.read_bytes().startswith(PNG) and p.stat().st_size > 5000


def test_rich_table(moved):
    console = Console(record=True, width=220)
    console.print(to_rich(moved))
    out = console.export_text()
    assert "dynopool report: tiny" in out and "block.conv1, block.down" in out and "0.625, 0.4" in out
