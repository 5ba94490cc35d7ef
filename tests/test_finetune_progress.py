"""The CLI's progress renderers: Rich bar on a terminal, plain lines otherwise."""
from __future__ import annotations

from dynopool_cli.finetune_progress import PlainLog, RichProgress
from dynopool_convert.training import FinetuneResult

START = {"total_steps": 10, "steps_per_epoch": 5, "epochs": 2, "start_step": 0, "budget": 5_500_000, "device": "cpu",
         "world": 1, "train_size": 320, "val_size": 64, "num_classes": 10, "input_size": [1, 28, 28],
         "groups": [1, 0]}  # scale_parameters order is not group order
STEP = {"kind": "step", "epoch": 0, "step": 5, "loss": 1.25, "task_loss": 1.2, "penalty": 0.05, "acc": 0.5,
        "flops": 5.9e6, "budget": 5_500_000, "r": [[0.5, 0.5]], "lr": {"weights": 0.1}, "img_s": 321.0}
EPOCH = {"kind": "epoch", "epoch": 0, "step": 5, "train_loss": 1.3, "train_acc": 0.4, "val_loss": 1.1, "val_acc": 0.6,
         "flops": 5_400_000, "budget": 5_500_000, "r": [[0.5, 0.45], [0.3, 0.25]], "r_saved": [[0.5, 0.45], [0.3, 0.25]], "lr": {}, "time_s": 3.2}


def test_plain_log_lines(capsys):
    log = PlainLog()
    log.on_start(START)
    log.on_step(STEP)
    log.on_epoch(EPOCH)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "step 5 loss 1.2500 acc 0.500 FLOPs 5.9M/5.5M 321 img/s"
    assert "val loss 1.1000 acc 0.6000" in out[2] and "saved FLOPs 5.4M/5.5M" in out[2] 
    assert "r group 0: 0.300x0.250, group 1: 0.500x0.450 |" in out[2]  # labelled, in the report's group order


def test_rich_progress_renders(capsys):
    bar = RichProgress()
    bar.console.force_terminal = True
    bar.on_start(START)
    bar.on_step(STEP)
    bar.on_epoch(EPOCH)
    bar.on_end(FinetuneResult(out_dir=".", steps=5, total_steps=10, completed=False, budget=1, final_flops=None, best_metric=0.6))
    err = capsys.readouterr().err
    assert "loss 1.2500" in err and "val loss 1.1000" in err and "5/10" in err
