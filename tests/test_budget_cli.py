"""``dynopool convert --budget``: prints fvcore FLOPs, fits, records, refuses cleanly."""
from __future__ import annotations

import pytest

import dynopool_convert as dc
from dynopool_cli.app import main
from dynopool_convert.flops import count_flops

# a small importable model (tests/ is on sys.path under pytest): VGG-like, max and avg pools
SOURCE = "budget_models:vgg_like"


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def _run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_budget_fits_and_is_recorded(tmp_path, capsys):
    path = tmp_path / "m.pt"
    code, out, err = _run(["convert", SOURCE, "--input-size", "32", "--budget", "2.5M", "--out", str(path)], capsys)
    assert code == 0, err
    assert "FLOPs at 32x32 (fvcore): original" in out and "budget 2.5M: fitted to" in out
    ck = dc.load_checkpoint(path, trust_source=True)  # our own test module
    assert ck.budget == 2_500_000 and tuple(ck.input_size) == (3, 32, 32)
    flops = ck.extra["flops"]
    assert flops["converted"] > 2_500_000 >= flops["final"]
    assert count_flops(ck.model, (3, 32, 32)) == flops["final"]


def test_a_share_of_the_original_is_fitted_and_recorded_in_flops(tmp_path, capsys):
    path = tmp_path / "m.pt"
    code, out, err = _run(["convert", SOURCE, "--input-size", "32", "--budget", "60%", "--out", str(path)], capsys)
    assert code == 0, err
    ck = dc.load_checkpoint(path, trust_source=True)
    original = ck.extra["flops"]["original"]
    assert ck.budget == round(0.6 * original) and ck.extra["flops"]["final"] <= ck.budget
    assert f"budget {dc.format_flops(ck.budget)}: fitted to" in out


@pytest.mark.parametrize("budget, words", [("0x", "share must be above 0"), ("4X", "4G, 4.1G, 500M"), ("-1G", "4G, 4.1G, 500M"), ("4 G", "e.g. 4G"),
                                           ("", "e.g. 4G"), ("1k", "minimum achievable")])
def test_bad_or_impossible_budget_exits_2_without_a_file(tmp_path, capsys, budget, words):
    path = tmp_path / "m.pt"
    code, _, err = _run(["convert", SOURCE, "--input-size", "32", "--budget", budget, "--out", str(path)], capsys)
    assert code == 2
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_fit_line_says_how_and_which_way_the_factors_moved():
    """A fit that keeps resolution may raise some group's ``r`` while lowering others: the line
    says "moving" then, and names the rule in words."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from dynopool_cli.convert_cmd import _print_fit

    lines = []
    for method, factors, raised in (("resolution", [0.7, 1.25], 0), ("per-group", [0.9, 1.0], 0), ("common", [0.8, 0.8], 3)):
        buf = io.StringIO()
        fit = SimpleNamespace(method=method, group_factors=factors, groups=[0, 1], final_flops=900_000, axes_raised=raised)
        _print_fit(Console(file=buf, width=200), fit, 1_000_000)
        lines.append(buf.getvalue())
    assert "by moving the scale factors (per group, keeping resolution;" in lines[0]
    assert "by lowering the scale factors (per group;" in lines[1]
    assert "raised" not in lines[0] + lines[1]
    assert lines[2].rstrip().endswith("group 1: 0.8), then 3 map sides raised one step alone")


def test_a_factor_that_moved_never_reads_as_1():
    """PNASNet at 64 px: a fit took 23% of its FLOPs by factors of 0.9999999 (maps at a rounding
    half-point each drop a pixel); printed to 4 digits they read 'r × 1', as if nothing moved."""
    from dynopool_cli.convert_cmd import format_factor

    assert (format_factor(1.0), format_factor(0.71875), format_factor(1.25)) == ("1", "0.7188", "1.25")
    assert format_factor(0.999999888241291) == "0.99999989"


def test_a_fit_that_crushes_a_map_points_to_the_input_site(tmp_path, capsys):
    # at 0.2x the fit takes the first group to r x 0.22 (32 -> 7 px); lowering the input
    # resolution, which --input-site allows, keeps more of every map
    code, out, err = _run(["convert", SOURCE, "--input-size", "32", "--budget", "0.2x", "--out", str(tmp_path / "a.pt")], capsys)
    assert code == 0, err
    assert "note: the fit shrinks some group's maps to under 33% of their size" in out and "--input-site" in out
    code, out, err = _run(["convert", SOURCE, "--input-size", "32", "--budget", "0.2x", "--input-site",
                           "--out", str(tmp_path / "b.pt")], capsys)
    assert code == 0, err
    assert "note: the fit shrinks" not in out
    code, out, err = _run(["convert", SOURCE, "--input-size", "32", "--budget", "0.8x", "--out", str(tmp_path / "c.pt")], capsys)
    assert code == 0 and "note: the fit shrinks" not in out


def test_a_budget_without_learned_group_points_to_the_input_site(tmp_path, capsys):
    argv = ["convert", "budget_models:flatten_only", "--input-size", "16", "--budget", "0.8x", "--out", str(tmp_path / "m.pt")]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "no learned group" in err and "with --input-site the input resolution may learn" in err
    assert "max_pool2d here" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "m.pt").exists()
    code, out, err = _run([*argv, "--input-site"], capsys)
    assert code == 0, err
    assert "fitted to" in out and (tmp_path / "m.pt").exists()
