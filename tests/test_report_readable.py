"""What a newcomer reads: one group numbering (the plan's ids, labelled, in order) everywhere,
terminal tables that fit 100 columns, FLOPs formatted alike, sites named rather than numbered."""
from __future__ import annotations

import copy
from html.parser import HTMLParser

import pytest
import torch
from rich.console import Console

from _report_fixtures import TinyConverted, tiny_plan, tiny_training
from dynopool_convert.group_ids import by_group, format_by_group, group_ids
from dynopool_convert.report import build_report, render, to_rich
from dynopool_convert.report import text
from dynopool_convert.report.figures import history_plot


def _renumbered() -> tuple[TinyConverted, dict]:
    """The tiny network with its groups numbered against module order: stem 2, pool 1, block 0."""
    model = TinyConverted()
    model.stem_pool.group = 2
    model.block_conv1_pool.group = model.block_down_pool.group = 0
    plan = tiny_plan()
    renumber = {0: 2, 2: 0}
    for site in plan["sites"]:
        if site["group"] is not None:
            site["group"] = renumber.get(site["group"], site["group"])
    for group in plan["groups"]:
        group["id"] = renumber.get(group["id"], group["id"])
    return model, plan


@pytest.fixture(scope="module")
def renumbered() -> dict:
    model, plan = _renumbered()
    with torch.no_grad():
        model.stem_pool.stride.copy_(torch.tensor([2.5, 2.5]))  # group 2
    return build_report(model, plan, source="tests:tiny", input_size=(3, 32, 32), budget=100_000,
                        training=tiny_training())


def test_group_ids_follow_the_plan_not_module_order():
    model, _ = _renumbered()
    assert group_ids(model) == [2, 1, 0]  # scale_parameters (module) order
    assert by_group(["stem", "pool", "block"], [2, 1, 0]) == {"0": "block", "1": "pool", "2": "stem"}
    assert list(by_group(["stem", "pool", "block"], [2, 1, 0])) == ["0", "1", "2"]
    assert format_by_group({"0": 1.0, "4": 0.9286}) == "group 0: 1.0, group 4: 0.9286"


def test_history_is_keyed_and_shown_in_group_order(renumbered):
    first = renumbered["history"][0]["r"]
    assert list(first) == ["0", "1", "2"]
    # tiny_training's rows list r in module order: stem (now group 2) first
    assert first["2"] == tiny_training()["progress"]["history"][0]["r"][0]
    columns, rows = text.history_rows(renumbered)
    cell = rows[0][columns.index("r (h, w)")]
    assert cell.startswith("group 0: ") and cell.index("group 1: ") < cell.index("group 2: ")


def test_an_epochs_scale_factors_are_the_saved_models_as_its_flops_are():
    # the epoch row's FLOPs are the budget-projected copy's: its r is shown, not the training model's
    report = {"history": [{"kind": "step", "flops": 120, "r": {"0": [1.0, 1.0]}},
                          {"kind": "epoch", "flops": 100, "r": {"0": [1.0, 1.0]}, "r_saved": {"0": [0.5, 0.5]}}]}
    columns, rows = text.history_rows(report)
    cells = [row[columns.index("r (h, w)")] for row in rows]
    assert cells[0].startswith("group 0: 1") and cells[1].startswith("group 0: 0.5")


def test_history_flops_formatted_like_the_rest(renumbered):
    md = render(renumbered, "md")
    history = md[md.index("## History"):]
    assert "100k" in history and "99k" in history and "100000" not in history  # as convert prints them


def test_site_labels():
    assert text.site_label({"name": "6", "op": "MaxPool2d(k=2, s=2, p=0)"}) == "6 (MaxPool2d)"
    assert text.site_label({"name": "features.4", "op": "nn.Conv2d(3, 8)"}) == "features.4 (Conv2d)"
    assert text.site_label({"name": "stem.conv", "op": "Conv2d(3, 8)"}) == "stem.conv"


def _long_names(report: dict) -> dict:
    """The report with site names as long as ResNet-50's."""
    long = copy.deepcopy(report)
    names = {"stem.conv": "conv1", "pool": "maxpool", "block.conv1": "layer2.0.conv2",
             "block.down": "layer2.0.downsample.0", "late_conv": "layer4.0.downsample.0"}
    for site in long["sites"]:
        site["name"] = names[site["name"]]
    for group in long["groups"]:
        group["sites"] = [names[n] for n in group["sites"]]
    return long


def _render(report: dict, width: int, wide: bool = False) -> str:
    console = Console(record=True, width=width)
    console.print(to_rich(report, wide=wide))
    return console.export_text()


def test_terminal_tables_fit_100_columns(renumbered):
    report = _long_names(renumbered)
    out = _render(report, 100)
    lines = out.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 100
    assert "…" not in out  # nothing cut
    for site in report["sites"]:  # values are whole, on one line each
        if site["r"] is not None:
            assert any(text.pair(site["r"]) in line for line in lines), site["name"]
        assert any(f"{text.size(site['input_size'])} → {text.size(site['output_size'])}" in line for line in lines)
    assert "RF init" not in out


def test_wide_shows_every_column(renumbered):
    out = _render(_long_names(renumbered), 240, wide=True)
    assert all(column in out for column in text.SITE_COLUMNS) and "…" not in out


class _Captions(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.captions: list[str] = []
        self._in = False

    def handle_starttag(self, tag, attrs) -> None:
        self._in = tag == "figcaption"

    def handle_endtag(self, tag) -> None:
        self._in = False

    def handle_data(self, data) -> None:
        if self._in:
            self.captions.append(data)


def test_html_captions_and_site_names(renumbered):
    report = copy.deepcopy(renumbered)
    report["sites"][1]["name"] = "6"  # a layer of an nn.Sequential
    report["groups"][1]["sites"] = ["6"]
    page = render(report, "html")
    parser = _Captions()
    parser.feed(page)
    assert len(parser.captions) == 2 and not any(c.endswith(".png") for c in parser.captions)
    assert "6 (max_pool2d)" in page and "<td>6</td>" not in page


def test_every_history_panel_has_its_x_label_and_no_blank_band(renumbered):
    fig = history_plot(renumbered)
    axes = fig.get_axes()
    assert len(axes) == 3  # r, FLOPs, accuracy
    for ax in axes:
        assert ax.get_xlabel() == "epoch"
        assert ax.xaxis.get_tick_params().get("labelbottom", True)  # sharex hides them but on the last
    # a fixed subplot grid leaves a band between the title and the first panel; constrained does not
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    assert axes[1].yaxis.get_major_formatter()(5_040_000, 0) == "5.04M"
