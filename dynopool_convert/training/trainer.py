"""The fine-tuning loop: weights and DynOPool strides together, under a FLOPs budget.

Per step: task loss (label smoothing) + lambda * budget_penalty(cost_model(), budget), gradient
clipping, optimiser step, ``clamp_strides_``, scheduler ``step_update``. Per epoch (and every
``checkpoint_every`` steps): a budget-projected copy of the model is evaluated and saved as
``last.pt`` (``best.pt`` when its validation accuracy is the best so far) with the training
state; the strides as trained are kept in the state, so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint_extra import with_current_flops
from ..dynopool import clamp_strides_, scale_parameters
from ..errors import UserInputError
from ..group_ids import group_ids
from . import upstream
from .data import build_datasets, carve_holdout, holdout_cap, parse_data_spec, unreadable_warnings
from .evaluation import autocast, score, val_sample
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, cleanup, init_distributed, wrap_ddp
from .head_budget import after_new_head
from .heads import adapt_head, check_classifier
from .interrupt import StopFlag
from .outputs import logits_only
from .model_io import BEST, CONVERTED, LAST, as_float32, load_model, project_copy, save_model
from .optim import build_optimizer, build_scheduler
from .recipes import FinetuneConfig, check_resumable, load_recipe, merge_config
from .sampler import EpochSampler
from .size_control import SizeControl, search_has_choices
from .size_guard import SizeGuard
from .sizes import SizeSchedule
from .state import TrainProgress, atomic_write_text, capture_rng, read_jsonl, remove_stale_temp_files, restore_rng
from .weight_average import WeightAverage

__all__ = ["finetune", "FinetuneResult", "TrainCallbacks", "TrainingDiverged", "METRICS"]

METRICS = "metrics.jsonl"


class TrainingDiverged(UserInputError):
    """The loss or the weights became NaN/inf: the run stopped without saving (exit code 2 in the CLI)."""


class TrainCallbacks:
    """Hooks for progress display (called on rank 0 only). Override what you need."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, row: dict[str, Any]) -> None: ...
    def on_epoch(self, row: dict[str, Any]) -> None: ...
    def on_message(self, text: str) -> None: ...
    def on_search(self, scored: int) -> None: ...  # the size search scored its n-th allocation (it can take minutes)
    def on_end(self, result: "FinetuneResult") -> None: ...


@dataclass
class FinetuneResult:
    """What a run produced."""

    out_dir: Path
    steps: int
    total_steps: int
    completed: bool
    budget: int | None
    final_flops: int | None
    best_metric: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    strides: list[list[float]] = field(default_factory=list)
    is_main: bool = True  # rank 0 (the process that wrote the files)


def _group_r(model: nn.Module) -> list[list[float]]:
    return [[round(1.0 / v, 6) for v in p.detach().cpu().tolist()] for p in scale_parameters(model)]


def resolve_config(out_dir: Path, recipe: str | Path | None, overrides: dict | None, resume: bool,
                   trust_source: bool = False) -> FinetuneConfig:
    """defaults < config saved in last.pt (resume) < recipe < overrides."""
    saved = None
    if resume and (out_dir / LAST).is_file():
        training = upstream.load_checkpoint(out_dir / LAST, trust_source=trust_source).training or {}
        saved = training.get("config")
    return merge_config(saved, load_recipe(recipe) if recipe else None, overrides)


def finetune(
    checkpoint: str | Path | None,
    out_dir: str | Path,
    *,
    config: FinetuneConfig | None = None,
    recipe: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    callbacks: TrainCallbacks | None = None,
    trust_source: bool = False,
    stop_after_steps: int | None = None,
) -> FinetuneResult:
    """Fine-tune a converted model (or convert ``config.model`` first) and write DIR/{last,best}.pt.

    ``config`` is used as is; otherwise it is merged from the saved config (``resume``), the
    ``recipe`` file and ``overrides`` (a nested mapping like a recipe's). ``stop_after_steps``
    ends this invocation after that many steps, saving ``last.pt`` (time-sliced jobs, tests).
    """
    out_dir = Path(out_dir)
    cfg = config if config is not None else resolve_config(out_dir, recipe, overrides, resume, trust_source)
    info = init_distributed(cfg.train.device)
    cbs = callbacks if (callbacks is not None and info.is_main) else TrainCallbacks()
    try:
        return _Run(cfg, info, cbs, out_dir).run(checkpoint, resume, trust_source, stop_after_steps)
    finally:
        cleanup(info)


class _Run:
    """One invocation of the loop (state shared by the small methods below)."""

    def __init__(self, cfg: FinetuneConfig, info: DistInfo, cbs: TrainCallbacks, out_dir: Path) -> None:
        self.cfg, self.info, self.cbs, self.out_dir = cfg, info, cbs, out_dir
        self.t = cfg.train
        self.rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup
    def run(self, checkpoint, resume: bool, trust_source: bool, stop_after_steps: int | None) -> FinetuneResult:
        cfg, t, info = self.cfg, self.t, self.info
        self.t0 = time.perf_counter()
        if not resume and (self.out_dir / LAST).exists():
            raise UserInputError(
                f"{self.out_dir / LAST} exists from an earlier run: pass --resume to continue it, or choose another --out"
            )
        if resume and info.is_main:
            remove_stale_temp_files(self.out_dir, (LAST, BEST, CONVERTED, METRICS))
        torch.manual_seed(t.seed)  # the same model on every rank (DDP also broadcasts rank 0's)
        if cfg.budget is not None:
            upstream.check_budget(cfg.budget)  # before any work (a share is resolved by load_model)
        spec = parse_data_spec(cfg.data)
        input_hint = tuple(cfg.input_size) if cfg.input_size else (3, 224, 224)
        bundle, converted_here = load_model(cfg, checkpoint, self.out_dir, resume, self._classes_for_convert(spec, input_hint),
                                            cfg.budget, trust_source)
        self.bundle, self.budget = bundle, bundle.budget
        if converted_here and info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_model(self.out_dir / CONVERTED, bundle, bundle.model, None, bundle.extra)
        data = build_datasets(spec, bundle.input_size, seed=t.seed, augment=cfg.augment)
        model = bundle.model.to(info.device)
        cast = as_float32(model)  # a model built in half precision trains in float32
        for note in [*data.notes, *([cast] if cast else [])] if info.is_main else []:
            self.cbs.on_message(note)
        self._classifier(model, data.num_classes)
        self.model = model
        self.scales = scale_parameters(model)
        self.average = WeightAverage(model, t.model_ema_decay) if t.model_ema else None
        if t.scale_lr <= 0:  # not learned by gradient: no stride gradients (they would feed gradient clipping)
            for p in self.scales:
                p.requires_grad_(False)
        learn = t.scale_lr > 0 and any(q.requires_grad for q in self.scales)
        self.size_log = SizeSchedule(model, t.size_refresh_every, info.device, learn)
        # only a budget needs the cost model: a model it refuses still fine-tunes without one,
        # and with a budget the refusal comes here, before any step
        self.cost = upstream.CostModel(model, bundle.input_size) if self.budget is not None else None
        if self.cost is not None:  # an impossible budget is refused before the first step
            upstream.check_reachable(model, self.budget, bundle.input_size, self.cost)
            if not resume and t.scale_lr <= 0:
                self._fit_to_budget_first()
        self.holdout = self._carve_holdout(data, resume, bundle.training)
        self.data = data
        self.val_indices = val_sample(len(data.val), t.val_limit, t.seed)  # the images every validation scores
        # DDP sees only the logits: the other outputs' parameters may not reach the loss
        self.ddp = wrap_ddp(logits_only(model, self.pick), info, find_unused=self.pick is not None)
        torch.manual_seed(t.seed + info.rank)  # dropout etc. differ between ranks

        self.sampler = EpochSampler(len(data.train), t.seed, info.rank, info.world)
        self.steps_per_epoch = len(self.sampler) // t.batch_size
        if self.steps_per_epoch < 1:
            raise UserInputError(f"batch size {t.batch_size} is larger than the training set's share per process ({len(self.sampler)})")
        self.total_steps = t.steps if t.steps is not None else (t.epochs or 1) * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.optimizer = build_optimizer(model, t)
        self.scheduler = build_scheduler(self.optimizer, t, self.total_steps)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.progress = TrainProgress()
        self.sizes = SizeControl(model, bundle.input_size, jitter=t.size_jitter, search=self.holdout is not None,
                                 settle=t.settle, total_steps=self.total_steps, seed=t.seed, learning=t.scale_lr > 0)
        if resume:
            self._restore(bundle.training)
        self.saved_step = self.progress.step if resume else None  # step of the last checkpoint on disk
        self.cbs.on_start({
            "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs,
            "start_step": self.progress.step, "budget": self.budget, "device": str(info.device), "world": info.world,
            "train_size": len(data.train), "val_size": len(data.val), "num_classes": data.num_classes,
            "input_size": list(bundle.input_size), "groups": group_ids(model),
        })
        stop = StopFlag(not info.enabled, self.cbs)
        try:
            completed = self._loop(stop, stop_after_steps)
        finally:
            stop.close()
            self.size_log.close()
        return self._finish(completed)

    def _classes_for_convert(self, spec, input_hint) -> int:
        """The data's class count, needed only to build a recipe's model (0 otherwise)."""
        if not self.cfg.model:
            return 0
        if spec.kind == "synthetic":
            return spec.options.get("classes", 4)
        return build_datasets(spec, input_hint).num_classes

    def _restore(self, training: dict) -> None:
        if training.get("world_size", 1) != self.info.world:
            raise UserInputError(f"--resume: last.pt was written by {training.get('world_size')} processes, this run has {self.info.world}")
        check_resumable(training.get("config", {}).get("train", {}), asdict(self.t), self.out_dir / LAST)
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        self.progress = TrainProgress.from_dict(training["progress"])
        self.size_log.load_state(training.get("size_log"))
        self.rows = [r for r in read_jsonl(self.out_dir / METRICS) if r.get("step", 0) <= self.progress.step]
        self.sizes.load_state(training.get("sizes"))
        if self.average is not None:
            self.average.restore(self.model, training["model_ema"])
        rng = training["rng"]
        restore_rng(rng[self.info.rank] if isinstance(rng, list) else rng)

    # ------------------------------------------------------------------ loop
    def _loader(self, epoch: int) -> DataLoader:
        t = self.t
        self.sampler.set_epoch(epoch, start=self.progress.step_in_epoch * t.batch_size)
        self.data.train.set_epoch(epoch)
        return DataLoader(self.data.train, batch_size=t.batch_size, sampler=self.sampler, drop_last=True,
                          num_workers=t.workers, pin_memory=self.info.device.type == "cuda",
                          generator=torch.Generator())  # own generator: the global RNG stays untouched

    def _loop(self, stop: StopFlag, stop_after_steps: int | None) -> bool:
        t, p, info = self.t, self.progress, self.info
        done_here = 0
        guard = SizeGuard(self.model, save=lambda: self._checkpoint(is_best=False))
        while p.step < self.total_steps:
            self._rejoin_holdout()
            epoch_t0, window_t0, window_imgs = time.perf_counter(), time.perf_counter(), 0
            sums = p.epoch_sums  # loss * n, correct, n over this epoch (this process), resumable
            for images, labels in self._loader(p.epoch):
                if self.sizes.search_due(p.step):
                    with self.size_log.released():
                        self._search_sizes()
                with guard.watch(p.step + 1):
                    row = self._step(images, labels)
                n = labels.shape[0]
                sums[0] += row["loss"] * n
                sums[1] += row["acc"] * n
                sums[2] += n
                window_imgs += n * info.world
                p.step += 1
                p.step_in_epoch += 1
                done_here += 1
                if p.step % t.log_every == 0 or p.step == self.total_steps:
                    row = self._step_row(row, window_imgs / max(time.perf_counter() - window_t0, 1e-9))
                    window_t0, window_imgs = time.perf_counter(), 0
                    self.rows.append(row)
                    self.cbs.on_step(row)
                epoch_done = p.step_in_epoch >= self.steps_per_epoch or p.step >= self.total_steps
                if epoch_done:
                    break
                interrupted = stop.requested or (stop_after_steps is not None and done_here >= stop_after_steps)
                if interrupted or (t.checkpoint_every and p.step % t.checkpoint_every == 0):
                    self._checkpoint(is_best=False)
                if interrupted:
                    return False
            with guard.watch(p.step):
                self._end_epoch(sums, time.perf_counter() - epoch_t0)
            if stop.requested or (stop_after_steps is not None and done_here >= stop_after_steps):
                return p.step >= self.total_steps
        return True

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        t, dev = self.t, self.info.device
        images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
        self.ddp.train()
        with self.sizes.step(self.progress.step):  # jittered sizes while the strides learn
            with autocast(dev, t.amp):
                logits = self.ddp(images)
                task = self.criterion(logits.float(), labels)
            flops = self.cost() if self.cost is not None else None
            penalty = upstream.budget_penalty(flops, self.budget, t.budget_mode) if flops is not None else torch.zeros(())
            loss = task + t.penalty_weight * penalty.to(task.device)
            self._stop_if_diverged(f"the loss is {loss.item()}", not bool(torch.isfinite(loss.detach())))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if t.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad)
        self.optimizer.step()
        clamp_strides_(self.model)
        if self.average is not None:
            self.average.update(self.model, self.progress.step + 1)
        self.sizes.hold()
        self._stop_if_diverged("the scale factors are NaN/inf", not all(bool(torch.isfinite(q).all()) for q in self.scales))
        self.size_log.after_step(self.progress.step + 1, learning=not self.sizes.settled)
        self.scheduler.step_update(num_updates=self.progress.step + 1)
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss.item(), "task_loss": task.item(), "penalty": float(penalty.detach()), "acc": acc.item(),
                "flops": None if flops is None else float(flops.detach())}

    def _search_sizes(self) -> None:
        """The held-out size search (every rank runs it alike on the whole held-out split)."""
        budget = self.budget
        self.cbs.on_message(f"size search on {len(self.holdout)} held-out training images (budget {budget:,} FLOPs)")
        self.scored = 0
        result = self.sizes.search(
            self.cost.flops, budget, self._holdout_losses,
            lambda: upstream.project_to_budget(self.model, budget, self.bundle.input_size, self.cost))
        self.sizes.rejoin_epoch = self.progress.epoch + 1
        row = {"kind": "search", "epoch": self.progress.epoch, "step": self.progress.step,
               **{k: v for k, v in result.items() if k != "evaluated"}}
        self.rows.append(row)
        self.cbs.on_message(
            f"size search: kept {' / '.join(f'{h}x{w}' for h, w in result['sizes'])} (from the {result['start']} sizes, "
            f"{result['evaluations']} allocations scored), held-out accuracy {result['accuracy']:.4f}, "
            f"{result['flops']:,} FLOPs; the sizes are fixed from here on")

    def _carve_holdout(self, data, resume: bool, training: dict | None):
        """The size search's held-out split, or None: no budget (nothing to weigh sizes against),
        no learnable sizes, or no allocation but the start within the budget (sizes not learned)."""
        t = self.t
        if not (t.size_search and self.budget is not None and self.scales):
            return None
        if t.scale_lr <= 0 and t.size_jitter == 0:
            start = (training or {}).get("sizes", {}).get("initial") if resume else None
            if not search_has_choices(self.model, self.bundle.input_size, self.cost.flops, self.budget, start):
                self.cbs.on_message("no size search: no allocation but the starting one fits the budget, "
                                    "so no training images are held out for it")
                return None
        cap = holdout_cap(t.holdout_max, t.steps, t.batch_size * self.info.world)
        return carve_holdout(data, t.holdout, cap, t.seed)

    def _classifier(self, model: nn.Module, classes: int) -> None:
        """The data's class count (a new classifier where it differs); with a new one, the original
        is counted again and the budget follows it, and sizes a convert-time fit chose for the old
        one go back to the converted model's, to be fitted again (``head_budget.py``)."""
        had = adapt_head(model, self.bundle, classes, self.cfg.num_classes, self.info.device, self.cbs.on_message, self.t.output)
        if had is not None:
            refit = self.t.scale_lr <= 0 and not self.bundle.training and self.bundle.budget is not None
            after_new_head(model, self.bundle, self.cfg.budget, (had, classes), refit, say=self.cbs.on_message)
        self.budget = self.bundle.budget
        self.pick = check_classifier(model, self.bundle.input_size, self.info.device, classes, self.t.output, self.cbs.on_message)

    def _fit_to_budget_first(self) -> None:
        """Strides not learned by gradient: nothing would bring a model over its budget into it
        before the size search, so it is fitted first (``fit_to_budget``, as ``convert --budget``
        does) and trains at sizes the budget allows from the first step. The axis fill runs when
        the recipe asks for it (``convert.axis_fill``) or the checkpoint's own fit used it."""
        flops = self.cost.flops()
        if flops <= self.budget:
            return
        counts = (self.bundle.extra or {}).get("flops") or {}
        fill = bool(self.cfg.convert.axis_fill or counts.get("axes_raised"))
        fit = upstream.fit_to_budget(self.model, self.budget, self.bundle.input_size, self.cost, axis_fill=fill)
        raised = f", then {fit.axes_raised} map sides raised one step alone" if fit.axes_raised else ""
        self.cbs.on_message(f"the model ({flops:,} FLOPs) is over its budget: fitted to {fit.final_flops:,} FLOPs "
                            f"({fit.method}{raised}) before the first step")

    def _rejoin_holdout(self) -> None:
        """From the epoch after the search, the held-out images train again (their one use is done)."""
        full = getattr(self.data.train, "full", None)
        if full is None or not self.sizes.rejoins(self.progress.epoch):
            return
        self.data.train = full
        self.sampler = EpochSampler(len(full), self.t.seed, self.info.rank, self.info.world)
        self.steps_per_epoch = len(self.sampler) // self.t.batch_size
        self.cbs.on_message(f"the {len(self.holdout)} held-out images train again from epoch {self.progress.epoch}")

    def _stop_if_diverged(self, what: str, bad: bool) -> None:
        """Stop the run (every rank) when training produced NaN/inf; the files on disk stay as they were."""
        if self.info.enabled:
            bad = all_reduce_sum([float(bad)], self.info)[0] > 0
        if not bad:
            return
        kept = (f"{self.out_dir / LAST} (step {self.saved_step}) is kept" if self.saved_step is not None
                else "no checkpoint had been written yet")
        raise TrainingDiverged(
            f"training diverged at step {self.progress.step + 1} (epoch {self.progress.epoch}): {what}; stopped, "
            f"{kept}; lower the learning rate (train.lr {self.t.lr:g}, train.scale_lr {self.t.scale_lr:g})"
        )

    def _step_row(self, row: dict[str, Any], img_s: float) -> dict[str, Any]:
        loss, task, pen, acc = all_reduce_sum([row["loss"], row["task_loss"], row["penalty"], row["acc"]], self.info)
        w = self.info.world
        return {
            "kind": "step", "epoch": self.progress.epoch, "step": self.progress.step, "loss": loss / w,
            "task_loss": task / w, "penalty": pen / w, "acc": acc / w, "flops": row["flops"], "budget": self.budget,
            "r": _group_r(self.model), "lr": self._lrs(), "img_s": round(img_s, 2),
        }

    def _lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    # ------------------------------------------------------------------ epochs, saving
    def _holdout_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image loss and correctness on the whole held-out split (every rank alike): one
        allocation scored by the size search, reported to the progress display."""
        scored = score(self.model, self.holdout, self.t.batch_size, self.t.workers, self.info.device, self.t.amp, output=self.pick)
        self.scored += 1
        self.cbs.on_search(self.scored)
        return scored

    def _evaluate(self, model: nn.Module) -> tuple[float, float]:
        info = self.info
        losses, correct = score(model, self.data.val, self.t.batch_size, self.t.workers, info.device, self.t.amp,
                                indices=self.val_indices[info.rank::info.world], output=self.pick)
        loss_sum, correct, count = all_reduce_sum([float(losses.double().sum()), float(correct.sum()), len(losses)], info)
        return loss_sum / max(count, 1), correct / max(count, 1)

    def _end_epoch(self, sums: list[float], seconds: float) -> None:
        p = self.progress
        loss_sum, correct, n = all_reduce_sum(sums, self.info)
        projected, flops, projection = self._saved_copy()
        val_loss, val_acc = self._evaluate(projected)
        row = {
            "kind": "epoch", "epoch": p.epoch, "step": p.step, "train_loss": loss_sum / max(n, 1),
            "train_acc": correct / max(n, 1), "val_loss": val_loss, "val_acc": val_acc,
            "val_images": len(self.val_indices), "flops": flops,
            "budget": self.budget, "r": _group_r(self.model), "r_saved": _group_r(projected), "lr": self._lrs(),
            "time_s": round(seconds, 3), "projection": projection, "distinct_sizes": self.size_log.distinct,
        }
        self.rows.append(row)
        p.history.append(row)
        is_best = p.best_metric is None or val_acc > p.best_metric
        if is_best:
            p.best_metric, p.best_epoch = val_acc, p.epoch
        p.epoch += 1
        p.step_in_epoch = 0
        p.epoch_sums = [0.0, 0.0, 0.0]
        self.cbs.on_epoch(row)
        for warning in unreadable_warnings(self.data):  # once per epoch while files are being skipped
            self.cbs.on_message(warning)
        self._checkpoint(is_best=is_best, projected=(projected, flops))

    def _saved_copy(self) -> tuple[nn.Module, int, dict | None]:
        """What is evaluated and saved: a budget-projected copy, with the averaged weights under model_ema."""
        projected, flops, projection = project_copy(self.model, self.budget, self.bundle.input_size)
        if self.average is not None:
            self.average.load_into(projected)
        return projected, flops, projection

    def _training_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": all_gather_objects(capture_rng(), self.info),
            "progress": self.progress.to_dict(),
            "raw_strides": [p.detach().cpu().clone() for p in scale_parameters(self.model)],
            "sizes": self.sizes.state(),
            "size_log": self.size_log.state(),
            "config": self.cfg.to_dict(),
            "world_size": self.info.world,
            "total_steps": self.total_steps,
            **({"model_ema": self.average.state(self.model)} if self.average is not None else {}),
        }

    def _checkpoint(self, is_best: bool, projected: tuple[nn.Module, int] | None = None) -> None:
        """Save last.pt (and best.pt): the budget-projected weights + the training state."""
        finite = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        self._stop_if_diverged("the weights hold NaN/inf", not finite)  # never save a diverged model
        training = self._training_state()  # collective (RNG gather): every rank calls it
        if projected is None:
            projected = self._saved_copy()[:2]
        model, flops = projected
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            extra = with_current_flops(self.bundle.extra, flops)
            save_model(self.out_dir / LAST, self.bundle, model, training, extra)
            if is_best:
                save_model(self.out_dir / BEST, self.bundle, model, training, extra)
            atomic_write_text(self.out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in self.rows))
        barrier(self.info)
        self.saved_step = self.progress.step

    def _finish(self, completed: bool) -> FinetuneResult:
        strides = [p.detach().cpu().tolist() for p in scale_parameters(self.model)]
        gathered = all_gather_objects(strides, self.info)
        if any(s != gathered[0] for s in gathered):
            raise RuntimeError(f"ranks disagree on the strides: {gathered}")
        final_flops = None
        if completed:
            last_epoch = self.progress.history[-1] if self.progress.history else None
            final_flops = last_epoch["flops"] if last_epoch else None
        result = FinetuneResult(
            self.out_dir, self.progress.step, self.total_steps, completed, self.budget, final_flops,
            self.progress.best_metric, list(self.progress.history), time.perf_counter() - self.t0, strides,
            self.info.is_main,
        )
        self.cbs.on_end(result)
        return result
