"""Bad input everywhere (issue 8): every refused command line exits 2 with exactly one line on
stderr saying what is wrong, prints no traceback and writes or overwrites no file.

The command lines run as real processes: ``tests/_cli_batch.py`` imports the CLI once and forks
one child per case (own cwd, file descriptors and exit code), which keeps ~60 cases under half
a minute. A few cases also run through a plain ``python -m dynopool_cli`` to check the driver.
"""
from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import dynopool_convert as dc

REPO = Path(__file__).resolve().parents[1]
SOURCE, SIZE = "timm:test_resnet", "32"  # 0.5M parameters: a 1.5 MB checkpoint
BUILD = ["--build-arg", "num_classes=10"]
CONVERT = ["convert", SOURCE, "--input-size", SIZE, *BUILD]
DEFAULT_OUT = "test_resnet-dynopool.pt"  # convert's default output name, pre-created in every cwd
OLD = b"old contents that must survive\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "cli"), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "200"
    env["OMP_NUM_THREADS"] = "1"  # tiny models: extra threads only slow them down on a shared machine
    return env


# ---------------------------------------------------------------- input files


class _Evil:
    """Unpickling this runs a shell command (the classic malicious-pickle payload)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _write_inputs(folder: Path) -> dict[str, Path]:
    """A good checkpoint and every broken variant of it; returns name -> path."""
    model = dc.build_model(SOURCE, {"num_classes": 10})
    result = dc.convert(model, input_size=(3, 32, 32), validate=False)
    good = dc.save_checkpoint(folder / "good.pt", result.model, result.plan, SOURCE, {"num_classes": 10}, (3, 32, 32))
    raw = good.read_bytes()
    payload = torch.load(good, weights_only=True)
    files = {"good": good}

    def save(name: str, obj) -> None:
        files[name] = folder / f"{name}.pt"
        torch.save(obj, files[name])

    def edited(**changes) -> dict:
        out = dict(payload)
        out.update(changes)
        return out

    def write(name: str, data: bytes) -> None:
        files[name] = folder / f"{name}.pt"
        files[name].write_bytes(data)

    write("empty", b"")
    write("truncated_half", raw[: len(raw) // 2])
    write("truncated_100", raw[:100])
    write("random", os.urandom(4096))
    write("text", b"this is not a checkpoint\n")
    save("foreign_state_dict", result.model.state_dict())  # a plain torch.save of weights
    save("tensor", torch.zeros(3))
    save("future_version", edited(format_version=99))
    save("no_plan", {k: v for k, v in payload.items() if k != "plan"})
    save("input_size_str", edited(input_size="abc"))
    save("plan_garbage", edited(plan={"format_version": 1, "sites": "garbage"}))
    plan = payload["plan"]
    first = next(i for i, s in enumerate(plan["sites"]) if s["status"] == "converted")
    renamed = [dict(s) for s in plan["sites"]]
    renamed[first]["name"] = "no.such.layer"
    save("plan_renamed_site", edited(plan={**plan, "sites": renamed}))
    flipped = [dict(s) for s in plan["sites"]]
    flipped[first]["status"] = "skipped"  # the plan no longer creates a layer the weights hold
    save("plan_vs_weights", edited(plan={**plan, "sites": flipped}))
    state = payload["state_dict"]
    stride_key = next(k for k in state if k.endswith("stride"))
    save("weights_missing_key", edited(state_dict={k: v for k, v in state.items() if k != stride_key}))
    weight_key = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    save("weights_wrong_shape", edited(state_dict={**state, weight_key: torch.zeros(1, 1)}))
    save("nan_stride", edited(state_dict={**state, stride_key: torch.full_like(state[stride_key], float("nan"))}))
    save("unknown_source", edited(source="timm:no_such_model_xyz"))
    save("factory_source", edited(source="evilmod:factory"))
    marker = folder.parent / "PWNED"  # must never exist: loading must not run the payload
    save("malicious_torch_save", edited(extra=_Evil(f"echo pwned > {shlex.quote(str(marker))}")))
    files["malicious_pickle"] = folder / "malicious_pickle.pt"
    with open(files["malicious_pickle"], "wb") as f:  # a bare pickle (not torch's zip format)
        pickle.dump({"format": "dynopool-checkpoint", "x": _Evil(f"echo pwned > {shlex.quote(str(marker))}")}, f)
    files["marker"] = marker
    _write_finetune_inputs(folder, files)
    return files


def _png(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def _write_finetune_inputs(folder: Path, files: dict[str, Path]) -> None:
    """Image folders (good, a split missing, no images, corrupt files), recipes, a 2-class model."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(3):
                _png(folder / "images" / split / c / f"{i}.png", seed=i)
    _png(folder / "no_val" / "train" / "a" / "0.png", seed=0)
    (folder / "no_images" / "train" / "a").mkdir(parents=True)
    (folder / "no_images" / "val" / "a").mkdir(parents=True)
    (folder / "no_images" / "train" / "a" / "notes.txt").write_text("not an image")
    import shutil

    shutil.copytree(folder / "images", folder / "corrupt")
    (folder / "corrupt" / "train" / "a" / "bad.png").write_bytes(b"not a png at all")
    good = (folder / "images" / "train" / "b" / "0.png").read_bytes()
    (folder / "corrupt" / "train" / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    shutil.copytree(folder / "images", folder / "all_corrupt_val")
    for png in (folder / "all_corrupt_val" / "val").rglob("*.png"):
        png.write_bytes(b"garbage")
    recipes = {
        "unknown_key": "train:\n  lr: 0.1\n  bogus: 1\n",
        "wrong_type": "train:\n  lr: fast\n",
        "not_yaml": "[1, 2\n",
        "not_mapping": "- a\n- b\n",
        "negative_lr": "train:\n  lr: -1.0\n",
        "nan_lr": "train:\n  lr: .nan\n",
        "unknown_opt": "train:\n  opt: nosuchopt\n",
        "unknown_sched": "train:\n  sched: nosuchsched\n",
        "top_level_typo": "budgte: 4G\n",
        "every_step": "train:\n  checkpoint_every: 1\n",
    }
    for name, text in recipes.items():
        (folder / f"recipe_{name}.yaml").write_text(text)
    model = dc.build_model(SOURCE, {"num_classes": 2})
    result = dc.convert(model, input_size=(3, 32, 32), validate=False)
    files["good2"] = dc.save_checkpoint(folder / "good2.pt", result.model, result.plan, SOURCE, {"num_classes": 2}, (3, 32, 32))
    seg = "torchvision:lraspp_mobilenet_v3_large"  # outputs a dict {"out": N x classes x H x W}
    result = dc.convert(dc.build_model(seg, {"num_classes": 4}), input_size=(3, 32, 32), validate=False)
    files["segmentation"] = dc.save_checkpoint(folder / "segmentation.pt", result.model, result.plan, seg,
                                               {"num_classes": 4}, (3, 32, 32))


# A module:factory source whose import leaves a marker and which rebuilds the same model.
EVILMOD = """
import pathlib
pathlib.Path("IMPORTED").write_text("imported")

def factory(**kwargs):
    import timm
    return timm.create_model("test_resnet", pretrained=False, **kwargs)
"""


# ---------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # "{in}/NAME" is an input file; everything else is literal
    words: tuple[str, ...]  # each must appear (case-insensitive) in the error line


def _report(name: str, *more: str) -> tuple[str, ...]:
    return ("report", f"{{in}}/{name}.pt", "-f", "json", "-o", "out.json", *more)


# --out fresh: the folder must not even be created when the input is refused
SYNTH = "synthetic:classes=10,train=16,val=8"


def _finetune(*more: str, ckpt: str = "good", out: str = "fresh") -> tuple[str, ...]:
    return ("finetune", f"{{in}}/{ckpt}.pt", "--steps", "2", "--batch-size", "4", "--device", "cpu", "--out", out, *more)


def _recipe(name: str) -> tuple[str, ...]:
    return _finetune("--data", SYNTH, "--recipe", f"{{in}}/recipe_{name}.yaml")


CASES = [
    # models
    Case("model-misspelled", ("convert", "resnt50"), ("unknown", "'resnt50'", "resnet50")),
    Case("model-timm-misspelled", ("convert", "timm:resnt18"), ("unknown timm model", "resnet18")),
    Case("model-torchvision-misspelled", ("convert", "torchvision:resnt18"), ("unknown torchvision model", "resnet18")),
    Case("model-garbage", ("convert", "not a model!"), ("unknown", "accepted")),
    Case("model-bad-factory-form", ("convert", "a-b:c"), ("package.module:factory",)),
    Case("model-factory-missing-module", ("convert", "no_such_module_xyz:factory"), ("cannot import", "no_such_module_xyz")),
    Case("build-arg-unknown", ("convert", SOURCE, "--input-size", SIZE, "--build-arg", "foo=1"), ("cannot build", "foo")),
    Case("build-arg-no-equals", ("convert", SOURCE, "--build-arg", "noequals"), ("key=value", "noequals")),
    Case("build-arg-wrong-type", ("convert", SOURCE, "--input-size", SIZE, "--build-arg", "num_classes=abc"), ("cannot build", "num_classes")),
    # budgets
    *[
        Case(f"budget-malformed-{label}", (*CONVERT, "--budget", text), ("invalid budget", "4G"))
        for label, text in [("4X", "4X"), ("neg", "-1G"), ("nan", "nanG"), ("space", "4 G"), ("empty", ""), ("inf", "inf"), ("zero", "0")]
    ],
    Case("budget-impossible", (*CONVERT, "--budget", "1k"), ("cannot be met", "at least")),
    # input sizes
    *[
        Case(f"input-size-{label}", ("convert", SOURCE, "--input-size", text), ("input size", "positive integers"))
        for label, text in [("zero", "0"), ("abc", "abc"), ("10x", "10x"), ("neg", "-3"), ("3d", "32x32x32"), ("empty", "")]
    ],
    Case("input-size-too-small", ("convert", "torchvision:squeezenet1_0", "--input-size", "8"), ("fails on an input", "--input-size")),
    Case("input-size-not-the-built-one", ("convert", "timm:deit_tiny_patch16_224", "--input-size", "64"),
         ("fails on an input", "--build-arg img_size=64", "dynamic_img_size=true")),
    Case("input-size-channels", ("convert", SOURCE, "--input-size", "1,32,32"), ("takes 3 channels", "in_chans=1")),
    Case("input-size-not-patch-multiple", ("convert", "timm:test_vit", "--input-size", "24"), ("fails on an input", "patch size")),
    Case("report-input-size-abc", _report("good", "--input-size", "abc"), ("bad input size", "accepted")),
    Case("report-input-size-zero", _report("good", "--input-size", "0"), ("bad input size",)),
    Case("report-input-size-channels", _report("good", "--input-size", "1,32,32"), ("1 channels", "takes 3")),
    # options and values
    Case("option-unknown", (*CONVERT, "--bogus"), ("no such option", "--bogus")),
    Case("option-missing-value", ("convert", SOURCE, "--input-size"), ("requires an argument", "--input-size")),
    Case("enum-placement", (*CONVERT, "--placement", "middle"), ("--placement", "before", "after")),
    Case("enum-aggregate", (*CONVERT, "--aggregate", "median"), ("--aggregate", "max", "mean")),
    Case("enum-report-format", _report("good", "--format", "pdf"), ("--format", "json")),
    Case("command-unknown", ("nosuchcommand",), ("no such command", "nosuchcommand")),
    Case("argument-missing", ("report",), ("missing argument", "checkpoint")),
    Case("demo-size-zero", ("demo", "--size", "0"), ("--size",)),
    Case("demo-size-huge", ("demo", "--size", "100000000"), ("--size", "4096")),
    Case("demo-stride-nan", ("demo", "--stride", "nan"), ("--stride",)),
    # output paths
    Case("out-is-directory", (*CONVERT, "--out", "."), ("directory",)),
    Case("out-folder-missing", (*CONVERT, "--out", "nodir/x.pt"), ("does not exist", "nodir")),
    Case("out-under-a-file", (*CONVERT, "--out", "out.json/x.pt"), ("not a folder",)),
    Case("report-out-is-directory", ("report", "{in}/good.pt", "-f", "json", "-o", "."), ("directory",)),
    Case("report-figures-is-file", _report("good", "--figures", "out.json"), ("figures", "not a folder")),
    # checkpoint paths and files
    Case("ckpt-missing", _report("missing"), ("does not exist", "missing.pt")),
    Case("ckpt-is-directory", ("report", "{in}", "-f", "json", "-o", "out.json"), ("not a file",)),
    Case("ckpt-empty", _report("empty"), ("empty",)),
    Case("ckpt-truncated-half", _report("truncated_half"), ("not a readable", "truncated")),
    Case("ckpt-truncated-100-bytes", _report("truncated_100"), ("not a readable",)),
    Case("ckpt-random-bytes", _report("random"), ("not a readable",)),
    Case("ckpt-text", _report("text"), ("not a readable",)),
    Case("ckpt-foreign-state-dict", _report("foreign_state_dict"), ("not a dynopool checkpoint",)),
    Case("ckpt-foreign-tensor", _report("tensor"), ("not a dynopool checkpoint",)),
    Case("ckpt-future-version", _report("future_version"), ("format version 99",)),
    Case("ckpt-no-plan", _report("no_plan"), ("corrupt", "'plan'")),
    Case("ckpt-input-size-str", _report("input_size_str"), ("corrupt", "'input_size'")),
    Case("ckpt-plan-garbage", _report("plan_garbage"), ("corrupt", "plan")),
    Case("ckpt-plan-renamed-site", _report("plan_renamed_site"), ("plan does not match", "no.such.layer")),
    Case("ckpt-plan-vs-weights", _report("plan_vs_weights"), ("does not match", "unexpected key")),
    Case("ckpt-weights-missing-key", _report("weights_missing_key"), ("does not match", "missing key")),
    Case("ckpt-weights-wrong-shape", _report("weights_wrong_shape"), ("does not match", "size mismatch")),
    Case("ckpt-nan-stride", _report("nan_stride"), ("corrupt", "non-finite")),
    Case("ckpt-unknown-source", _report("unknown_source"), ("unknown timm model", "no_such_model_xyz")),
    Case("ckpt-malicious-torch-save", _report("malicious_torch_save"), ("refusing", "system")),
    Case("ckpt-malicious-pickle", _report("malicious_pickle"), ("not a readable", "never loads")),
    Case("ckpt-factory-untrusted", _report("factory_source"), ("evilmod:factory", "--trust-source")),
    # finetune: checkpoints, data, recipes, flags, output folder
    Case("ft-ckpt-missing", _finetune(ckpt="missing"), ("does not exist",)),
    Case("ft-ckpt-truncated", _finetune(ckpt="truncated_half"), ("not a readable",)),
    Case("ft-ckpt-malicious", _finetune(ckpt="malicious_torch_save"), ("refusing", "system")),
    Case("ft-ckpt-factory-untrusted", _finetune(ckpt="factory_source"), ("--trust-source",)),
    Case("ft-data-missing-split", _finetune("--data", "imagefolder:{in}/no_val", ckpt="good2"), ("val",)),
    Case("ft-data-no-images", _finetune("--data", "imagefolder:{in}/no_images", ckpt="good2"), ("no images",)),
    Case("ft-data-missing-dir", _finetune("--data", "imagefolder:{in}/nodir"), ("not found",)),
    Case("ft-data-unknown-kind", _finetune("--data", "imagenet:{in}"), ("unknown data spec", "imagefolder:DIR")),
    Case("ft-data-synthetic-option", _finetune("--data", "synthetic:classes=0"), ("synthetic", "positive")),
    # a class count that differs from the model's gets a fresh head (tests/test_heads.py); one that
    # differs from an explicit --num-classes is refused
    Case("ft-data-classes-mismatch", _finetune("--data", "imagefolder:{in}/images", "--num-classes", "3"),
         ("--num-classes 3", "2 classes")),
    Case("ft-data-val-all-corrupt", _finetune("--data", "imagefolder:{in}/all_corrupt_val", ckpt="good2"), ("no readable image", "val")),
    Case("ft-recipe-unknown-key", _recipe("unknown_key"), ("unknown recipe key", "train.bogus")),
    Case("ft-recipe-top-level-typo", _recipe("top_level_typo"), ("unknown recipe key", "budgte")),
    Case("ft-recipe-wrong-type", _recipe("wrong_type"), ("train.lr", "float")),
    Case("ft-recipe-not-yaml", _recipe("not_yaml"), ("not valid yaml",)),
    Case("ft-recipe-not-mapping", _recipe("not_mapping"), ("mapping",)),
    Case("ft-recipe-negative-lr", _recipe("negative_lr"), ("train.lr", "finite")),
    Case("ft-recipe-nan-lr", _recipe("nan_lr"), ("train.lr", "finite")),
    Case("ft-recipe-unknown-opt", _recipe("unknown_opt"), ("train.opt", "nosuchopt")),
    Case("ft-recipe-unknown-sched", _recipe("unknown_sched"), ("train.sched", "nosuchsched")),
    Case("ft-recipe-missing", _finetune("--recipe", "{in}/nope.yaml"), ("recipe not found",)),
    Case("ft-segmentation-model", _finetune("--data", SYNTH, ckpt="segmentation"), ("image classifiers", "'out'")),
    Case("ft-val-limit-zero", _finetune("--data", SYNTH, "--val-limit", "0"), ("--val-limit",)),
    Case("ft-lr-nan", _finetune("--data", SYNTH, "--lr", "nan"), ("train.lr", "finite")),
    Case("ft-lr-inf", _finetune("--data", SYNTH, "--lr", "inf"), ("train.lr", "finite")),
    Case("ft-scale-lr-negative", _finetune("--data", SYNTH, "--scale-lr", "-1"), ("train.scale_lr",)),
    Case("ft-epochs-zero", _finetune("--epochs", "0"), ("--epochs",)),
    Case("ft-batch-too-large", _finetune("--data", SYNTH, "--batch-size", "1000"), ("batch size 1000",)),
    Case("ft-device-unknown", _finetune("--device", "tpu"), ("unknown device", "cpu")),
    Case("ft-budget-malformed", _finetune("--budget", "4X"), ("invalid budget",)),
    Case("ft-budget-impossible", _finetune("--data", SYNTH, "--budget", "1k"), ("cannot be met",)),
    Case("ft-resume-nothing", _finetune("--resume", "--data", SYNTH), ("nothing to resume",)),
    Case("ft-out-has-earlier-run", _finetune("--data", SYNTH, out="run"), ("exists", "--resume")),
]
if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads mode-000 files, so only a user can check this
    CASES.append(Case("ckpt-unreadable", _report("unreadable"), ("cannot read", "permission denied")))

# Runs that succeed or stop half-way, checked by their own tests below (they share the batch)
SPECIAL = {
    "trusted": ("report", "{in}/factory_source.pt", "--trust-source", "-f", "json", "-o", "out.json"),
    "diverges": ("finetune", "{in}/good.pt", "--data", SYNTH, "--steps", "12", "--batch-size", "4", "--device", "cpu",
                 "--lr", "1e30", "--log-every", "1", "--recipe", "{in}/recipe_every_step.yaml", "--out", "diverged"),
    "corrupt-images": ("finetune", "{in}/good2.pt", "--data", "imagefolder:{in}/corrupt", "--steps", "4",
                       "--batch-size", "2", "--device", "cpu", "--out", "ok"),
}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``folder`` (hidden ones too) with its size and mtime."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _prepare_cwd(folder: Path) -> None:
    folder.mkdir()
    (folder / DEFAULT_OUT).write_bytes(OLD)  # a convert that fails must not overwrite it
    (folder / "out.json").write_bytes(OLD)  # nor a report
    (folder / "evilmod.py").write_text(EVILMOD)
    (folder / "run").mkdir()  # an earlier fine-tuning run that a fresh one must not overwrite
    (folder / "run" / "last.pt").write_bytes(OLD)


def _run_batch(cases: list[dict], tmp: Path) -> list[dict]:
    (tmp / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_cli_batch.py"), str(tmp / "cases.json"), str(tmp / "results.json")],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp / "results.json").read_text())
    (tmp / "timings.txt").write_text("".join(f"{r['seconds']:.2f} {' '.join(c['argv'])}\n" for c, r in zip(cases, results)))
    return results


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Run every case (and the trusted control) once; per case: result, cwd before/after."""
    tmp = tmp_path_factory.mktemp("bad_input")
    inputs = tmp / "inputs"
    inputs.mkdir()
    files = _write_inputs(inputs)
    if any(c.id == "ckpt-unreadable" for c in CASES):
        files["unreadable"] = inputs / "unreadable.pt"
        files["unreadable"].write_bytes(files["good"].read_bytes())
        files["unreadable"].chmod(0)
    inputs_before = _snapshot(inputs)
    runs, befores = [], {}
    for case_id, argv in [(c.id, c.argv) for c in CASES] + list(SPECIAL.items()):
        cwd = tmp / case_id
        _prepare_cwd(cwd)
        befores[case_id] = _snapshot(cwd)
        runs.append({"argv": [a.replace("{in}", str(inputs)) for a in argv], "cwd": str(cwd)})
    results = _run_batch(runs, tmp)
    return {
        "results": {run_id: res for run_id, res in zip([c.id for c in CASES] + list(SPECIAL), results)},
        "before": befores,
        "after": {case_id: _snapshot(tmp / case_id) for case_id in befores},
        "inputs_before": inputs_before,
        "inputs_after": _snapshot(inputs),
        "files": files,
        "tmp": tmp,
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_with_one_line_and_nothing_written(matrix, case):
    res = matrix["results"][case.id]
    assert "Traceback" not in res["stderr"] + res["stdout"], res["stderr"]
    lines = res["stderr"].splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{res['stderr']}"
    assert res["code"] == 2, f"exit code {res['code']}: {res['stderr']}"
    line = lines[0].lower()
    assert line.startswith("error: ")
    for word in case.words:
        assert word.lower() in line, f"{word!r} not in {lines[0]!r}"
    assert matrix["after"][case.id] == matrix["before"][case.id]  # nothing written, created or touched
    assert (matrix["tmp"] / case.id / DEFAULT_OUT).read_bytes() == OLD
    assert (matrix["tmp"] / case.id / "out.json").read_bytes() == OLD


def test_no_input_file_was_modified(matrix):
    assert matrix["inputs_after"] == matrix["inputs_before"]


def test_malicious_pickles_never_ran(matrix):
    """Both payloads are live (plain unpickling runs them, see below) yet nothing ran."""
    assert not matrix["files"]["marker"].exists()


def test_malicious_payload_is_live(matrix, tmp_path):
    """Control: unrestricted unpickling of the same files does run the payload."""
    marker = matrix["files"]["marker"]
    try:
        torch.load(matrix["files"]["malicious_torch_save"], weights_only=False)
        assert marker.exists()
        marker.unlink()
        with open(matrix["files"]["malicious_pickle"], "rb") as f:
            pickle.load(f)
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def test_untrusted_factory_source_is_not_imported(matrix):
    assert not (matrix["tmp"] / "ckpt-factory-untrusted" / "IMPORTED").exists()


def test_trust_flag_imports_the_factory(matrix):
    """Control: with --trust-source the same checkpoint's module is imported and the report written."""
    res = matrix["results"]["trusted"]
    assert res["code"] == 0, res["stderr"]
    cwd = matrix["tmp"] / "trusted"
    assert (cwd / "IMPORTED").exists()
    assert json.loads((cwd / "out.json").read_text())["source"] == "evilmod:factory"


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(matrix):
    """lr 1e30: the loss turns NaN a few steps in; exit 2, one line, last.pt from before is intact."""
    res = matrix["results"]["diverges"]
    assert res["code"] == 2 and "Traceback" not in res["stderr"], res["stderr"]
    assert len(res["stderr"].splitlines()) == 1 and "diverged at step" in res["stderr"], res["stderr"]
    out = matrix["tmp"] / "diverges" / "diverged"
    ck = dc.load_checkpoint(out / "last.pt")
    kept = ck.training["progress"]["step"]
    assert f"(step {kept}) is kept" in res["stderr"] and 1 <= kept < 12
    assert all(torch.isfinite(v).all() for v in ck.model.state_dict().values() if v.is_floating_point())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and max(r["step"] for r in rows) <= kept and all(r["loss"] == r["loss"] for r in rows if "loss" in r)


def test_corrupt_images_are_skipped_with_a_counted_warning(matrix):
    """Decision (docs/RELIABILITY.md): unreadable image files are skipped, counted and named."""
    res = matrix["results"]["corrupt-images"]
    assert res["code"] == 0, res["stderr"]
    warnings = [line for line in res["stderr"].splitlines() if "unreadable" in line]
    assert warnings and "skipped 2 unreadable image file(s) in train" in warnings[-1], res["stderr"]
    assert (matrix["tmp"] / "corrupt-images" / "ok" / "last.pt").exists()


@pytest.mark.parametrize("argv,word", [
    (["convert", "resnt50"], "resnet50"),
    (["convert", SOURCE, "--bogus"], "--bogus"),
])
def test_plain_python_dash_m(tmp_path, argv, word):
    """The fork driver behaves as ``python -m dynopool_cli``: the same checks, a few cases."""
    proc = subprocess.run([sys.executable, "-m", "dynopool_cli", *argv], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and word in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_saved_files_keep_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the final file gets 0666 minus the umask."""
    from dynopool_convert.files import atomic_write_text

    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capfd):
    """Ctrl-C during a command: exit code 130 (typer's mapping), no traceback."""
    from dynopool_cli.app import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dc, "build_model", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["convert", SOURCE, "--input-size", SIZE, "--dry-run"])
    assert exc.value.code == 130
    assert "Traceback" not in capfd.readouterr().err


class _TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x, t):
        return self.conv(x).mean((2, 3)) + t


def test_a_forward_with_a_required_second_argument_is_told_how_to_call_it():
    from dynopool_convert import convert
    from dynopool_convert.errors import UserInputError

    with pytest.raises(UserInputError, match=r"parameter t, but one was not passed in.*; dynopool calls a model with one image batch"):
        convert(_TwoInputs(), (3, 16, 16))
