"""Fine-tuning that replaces the classifier counts the original again with the new one: the
budget, the recorded original FLOPs and the fitted sizes are those of a model converted with
that class count from the start (``training/head_budget.py``)."""
from __future__ import annotations

import dynopool_convert as dc
from dynopool_convert.conversion import convert_source
from dynopool_convert.report.build import report_from_checkpoint
from dynopool_convert.report.text import si, summary_rows
from dynopool_convert.training import finetune
from test_heads import DATA, TRAIN, _Messages

# a model whose 1000-class classifier is a large share of its FLOPs at this size (about 30%)
SOURCE, SIZE = "timm:mobilenetv3_small_050", (3, 48, 80)


def _convert(tmp_path, name: str, classes: int, budget: str | None):
    done = convert_source(SOURCE, {"num_classes": classes}, input_size=SIZE, budget=budget)
    return dc.save_checkpoint(tmp_path / name, done.model, done.plan, done.source, done.build_args,
                              input_size=done.input_size, budget=done.budget, extra=done.extra)


def _strides(model) -> list[list[float]]:
    return [p.detach().tolist() for p in dc.scale_parameters(model)]


def _original(classes: int) -> int:
    return dc.count_flops(dc.build_model(SOURCE, {"num_classes": classes}), SIZE)


def test_a_share_from_convert_is_kept_and_sizes_are_fitted_as_if_converted_with_the_classes(tmp_path):
    wide = _convert(tmp_path, "wide.pt", 1000, "0.6x")
    direct = dc.load_checkpoint(_convert(tmp_path, "direct.pt", 4, "0.6x"))
    said = _Messages()
    finetune(wide, tmp_path / "run", callbacks=said, overrides={"data": DATA, "train": TRAIN})
    saved = dc.load_checkpoint(tmp_path / "run" / "last.pt")
    original = _original(4)
    assert original < 0.8 * _original(1000)  # the classifier matters here: else the test shows nothing
    assert saved.budget == direct.budget == round(0.6 * original)
    assert saved.extra["flops"]["original"] == original
    assert saved.extra["head"] == {"classes": [1000, 4], "original_flops": [_original(1000), original]}
    assert _strides(saved.model) == _strides(direct.model)  # refitted from the converted sizes, not the old fit
    assert saved.extra["flops"]["current"] <= saved.budget
    line = next(text for text in said.lines if text.startswith("original with 4 classes"))
    assert "keeps its share" in line and f"({saved.budget:,})" in line
    summary = dict(summary_rows(report_from_checkpoint(tmp_path / "run" / "last.pt")))
    assert summary["FLOPs original"] == f"{si(original)} (with the 4-class classifier; {si(_original(1000))} with 1000 classes)"


def test_a_share_given_to_finetune_is_of_the_original_with_the_new_classifier(tmp_path):
    plain = _convert(tmp_path, "plain.pt", 1000, None)
    two = {**TRAIN, "steps": 2}
    finetune(plain, tmp_path / "run", overrides={"data": DATA, "train": two, "budget": "0.7x"}, stop_after_steps=1)
    saved = dc.load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved.budget == round(0.7 * _original(4))
    assert saved.extra["flops"]["current"] <= saved.budget
    # resumed: the head is not replaced again, the budget stays
    finetune(None, tmp_path / "run", resume=True)
    again = dc.load_checkpoint(tmp_path / "run" / "last.pt")
    assert again.budget == saved.budget and again.extra["head"] == saved.extra["head"]


def test_a_budget_in_flops_stays_as_given(tmp_path):
    plain = _convert(tmp_path, "plain.pt", 1000, None)
    budget = int(0.7 * _original(4))
    finetune(plain, tmp_path / "run", overrides={"data": DATA, "train": TRAIN, "budget": str(budget)})
    saved = dc.load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved.budget == budget and saved.extra["flops"]["original"] == _original(4)


def test_same_classes_change_nothing(tmp_path):
    ckpt = _convert(tmp_path, "four.pt", 4, "0.6x")
    before = dc.load_checkpoint(ckpt)
    finetune(ckpt, tmp_path / "run", overrides={"data": DATA, "train": TRAIN})
    saved = dc.load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved.budget == before.budget and "head" not in saved.extra
    assert _strides(saved.model) == _strides(before.model)
