"""``dynopool convert``: parse, call the library, render the site table."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:  # rich is imported when the command runs (start-up time)
    from rich.table import Table


class Placement(str, Enum):
    exact = "exact"
    before = "before"
    after = "after"


class Aggregate(str, Enum):
    max = "max"
    mean = "mean"


#: the width of redirected output: a table takes its natural width, a line is never wrapped
_UNWRAPPED = 100_000

_STATUS_STYLE = {"converted": "green", "pinned": "cyan", "reverted": "yellow", "skipped": "dim"}


def _size(value: list[int] | None) -> str:
    return "?" if not value else "x".join(str(v) for v in value)


def site_table(plan) -> tuple[Table, list[str]]:
    """A Rich table of the plan's sites (name, op, group, input -> output, status), and the
    numbered reasons its status column refers to (one line each, identical reasons once)."""
    from rich.table import Table

    table = Table(title=f"DynOPool sites at input {_size(plan.input_size[1:])}", show_lines=False)
    table.add_column("site", overflow="fold")
    table.add_column("op", overflow="fold")
    table.add_column("group", justify="right")
    table.add_column("size in -> out", no_wrap=True)
    table.add_column("status", no_wrap=True)
    reasons: dict[str, int] = {}
    for s in plan.sites:
        out = s.converted_size if s.status == "converted" else s.output_size
        status = s.status
        if s.status == "converted" and s.placement == "patchify":
            status += " (patchify)"
        if s.reason:
            status += f" [{reasons.setdefault(s.reason, len(reasons) + 1)}]"
        table.add_row(
            s.name, s.op, "" if s.group is None else str(s.group),
            f"{_size(s.input_size)} -> {_size(out)}", f"[{_STATUS_STYLE.get(s.status, '')}]{status}[/]",
        )
    return table, [f"[{i}] {reason}" for reason, i in reasons.items()]


#: a group factor below this gets the --input-site hint (akamaster's ResNet-20 at 0.7x: its only
#: free group down to 3x3 from 16x16, r × 0.22; with --input-site: the input at 23 px, that map 12x12)
CRUSHED = 1 / 3


def format_factor(f: float) -> str:
    """A fit's factor on a group's r, to 4 digits, or to 8 decimals where 4 digits would read 1
    but it moved (a map at a rounding half-point, H / s = n + 0.5, drops a pixel for a factor of
    0.9999999: PNASNet's odd-sized cells at 64 px save 23% so)."""
    short = f"{f:.4g}"
    return short if short != "1" or f == 1.0 else f"{f:.8f}".rstrip("0")


def _print_fit(console, fit, budget_flops: int) -> None:
    """One line on how the converted model was fitted to its budget."""
    from dynopool_convert.flops import format_flops

    if fit.method == "none":
        console.print(f"budget {format_flops(budget_flops)}: already within it, strides unchanged")
        return
    from dynopool_convert.group_ids import by_group, format_by_group

    factors = format_by_group(by_group(fit.group_factors, fit.groups), format_factor)
    how = _FIT_METHODS.get(fit.method, fit.method)
    verb = "lowering" if max(fit.group_factors) <= 1.0 else "moving"
    raised = getattr(fit, "axes_raised", 0)
    then = f", then {raised} map side{'s' if raised > 1 else ''} raised one step alone" if raised else ""
    console.print(
        f"budget {format_flops(budget_flops)}: fitted to {format_flops(fit.final_flops)} "
        f"({fit.final_flops}) by {verb} the scale factors ({how}; r × {factors}){then}"
    )


#: the budget fit's methods, as the conversion's one line says them
_FIT_METHODS = {"common": "one factor for every group", "per-group": "per group", "input": "the input alone",
                "resolution": "per group, keeping resolution"}


def convert(
    model: Annotated[str, typer.Argument(help="resnet50 (timm, then torchvision), timm:NAME, torchvision:NAME, package.module:factory or path/to/file.py:factory (your own model: a function or class that returns it, called with the --build-args).")],
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="Reference input size: N, HxW or C,H,W (e.g. 1,28,28 for one channel; default: the model's own).")] = None,
    placement: Annotated[Optional[Placement], typer.Option(help="exact: every op kept behind a learnable resize that is the identity at init (the converted model computes what the original did; default with --weights/--pretrained); before/after: DynOPool before or after each strided conv (made stride 1), pools become DynOPool (default without weights: before). From scratch, before did better at a budget equal to the model's FLOPs and at 0.7 of it, exact at half of it (docs/RESULTS.md sections 6.5-6.6).")] = None,
    patchify: Annotated[bool, typer.Option("--patchify/--no-patchify", help="With placement 'before', patchify convs (kernel == stride, no padding) keep their stride behind a DynOPool that resizes their input to a multiple of the patch.")] = True,
    input_site: Annotated[bool, typer.Option("--input-site", help="Also learn the input resolution: a DynOPool site (input_resize) in front of the model, starting at stride 1, so that shrinking the input is one of the choices the budget and the size search weigh.")] = False,
    axis_fill: Annotated[bool, typer.Option("--axis-fill", help="With --budget: after the fit (every map scaled alike on both axes), raise one side of one map at a time while the budget allows (a coarse grid: ViT-B/32 under 0.5x gets 5x4 patches instead of 4x4). Off by default: on the one model measured it spent 20% more FLOPs for no accuracy (docs/RESULTS.md section 6.7).")] = False,
    aggregate: Annotated[Optional[Aggregate], typer.Option(help="Aggregate of every site (default: max for convs and max pools, mean for avg pools and interpolations).")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only convert sites matching this glob (repeatable; 'kind:conv|pool|interpolate' matches kinds).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Leave sites matching this glob alone (repeatable).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Checkpoint path (default: <model>-dynopool.pt in the current folder).")] = None,
    build_arg: Annotated[Optional[list[str]], typer.Option("--build-arg", help="KEY=VALUE passed to the model builder (repeatable; YAML values, or a Python tuple), e.g. num_classes=10, dynamic_img_size=true, img_size=(64,96).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, write nothing.")] = False,
    budget: Annotated[Optional[str], typer.Option("--budget", help="FLOPs budget at the reference size (fvcore count), e.g. 4G, 500M, 4.1e9, or a share of the original model's FLOPs: 0.7x, 70%. The converted model is fitted to it.")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Load this state dict first (.safetensors, .pt/.pth read weights-only; timm/torchvision key layouts, 'state_dict'/'model'/'module' wrappers).")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Load timm's/torchvision's own pretrained weights from the local cache (nothing is downloaded).")] = False,
) -> None:
    """Convert a model: every resizing op becomes a learnable DynOPool site; writes a checkpoint."""
    from dynopool_convert import resolve_source, save_checkpoint
    from dynopool_convert.budget import check_budget
    from dynopool_convert.conversion import convert_source
    from dynopool_convert.files import check_output_path
    from dynopool_convert.models import model_label, parse_build_args, parse_input_size
    from rich.console import Console

    if budget is not None:
        check_budget(budget)  # before any work; a share (0.7x) is resolved once the original is counted
    console = Console()
    if not console.is_terminal:  # redirected: whole lines (no 80-column wrap splitting site names)
        console = Console(width=_UNWRAPPED)
    source = resolve_source(model)
    path = out if out is not None else Path(f"{model_label(source)}-dynopool.pt")
    if not dry_run:  # a bad --out is refused before any work, not after it
        check_output_path(path, "checkpoint")
    done = convert_source(
        source, parse_build_args(build_arg), input_size=parse_input_size(input_size) if input_size is not None else None,
        weights=weights, pretrained=pretrained, budget=budget, progress=console.status,
        placement=placement.value if placement else None, aggregate=aggregate.value if aggregate else None,
        include=include, exclude=exclude, patchify=patchify, input_site=input_site, axis_fill=axis_fill,
    )
    budget_flops = done.budget
    _print_conversion(console, done, budget_flops)
    if dry_run:
        console.print("dry run: no checkpoint written")
        return
    saved = save_checkpoint(path, done.model, done.plan, done.source, done.build_args, input_size=done.input_size,
                            budget=budget_flops, extra=done.extra)
    console.print(f"checkpoint: {saved}")


def _print_conversion(console, done, budget_flops: int | None) -> None:
    """The site table, its reasons, the counts, notes, FLOPs, the budget fit and the weights."""
    from dynopool_convert.flops import format_flops
    from dynopool_convert.weights import weights_note

    plan, size = done.plan, done.input_size
    table, reasons = site_table(plan)
    console.print(table)
    for line in reasons:
        console.print(line, style="dim", markup=False, highlight=False)
    counts = plan.summary()
    console.print(
        f"{counts['converted']} sites converted in {counts['groups']} learned groups, "
        f"{counts['pinned']} pinned, {counts['reverted']} reverted, {counts['skipped']} left alone."
    )
    if counts["pinned"]:
        console.print("[dim]pinned: the op is kept, its input resized to its reference size, so that the layers "
                      "after it keep fixed shapes while the groups before it learn[/]")
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/]")
    original, converted = done.original_flops, done.converted_flops
    console.print(
        f"FLOPs at {size[1]}x{size[2]} (fvcore): original {format_flops(original)} ({original}), "
        f"converted {format_flops(converted)} ({converted})"
    )
    if done.fit is not None:
        _print_fit(console, done.fit, budget_flops)
        if not plan.policy.get("input_site") and min(done.fit.group_factors, default=1.0) < CRUSHED:
            console.print(f"[dim]note: the fit shrinks some group's maps to under {CRUSHED:.0%} of their size (r × "
                          f"{min(done.fit.group_factors):.3g}); --input-site lets the input resolution move too, "
                          f"which may keep more of every map[/]")
    origin = done.origin
    if origin is not None:
        console.print(f"weights: {origin.get('pretrained') or origin['path']} (sha256 {origin['sha256'][:12]}...), placement {done.placement}")
        note = weights_note(done.source, done.build_args, origin)
        if note:
            console.print(f"[dim]note: {note}[/]", highlight=False)
