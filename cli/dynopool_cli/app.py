"""Typer application: parses, calls the library, renders. Commands live in their own modules.

Errors: the library raises ``UserInputError`` for anything the user can fix; ``main`` prints
its one-line message to stderr and exits with code 2, without a traceback.

Start-up: nothing here imports the library (torch, timm, fvcore, numba: seconds); each command
imports what it needs when it runs, so ``--help`` answers at once (tests/test_cli_startup.py).
"""
from __future__ import annotations

import re
import sys

import typer

try:  # recent typer vendors click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import NoArgsIsHelpError, UsageError

app = typer.Typer(
    name="dynopool",
    help="Rewrite a vision model so that it learns the size and shape of its feature maps (DynOPool).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """dynopool: convert, fine-tune and report on models with learnable resizing (DynOPool)."""


@app.command()
def demo(
    size: int = typer.Option(56, min=1, max=4096, help="Spatial size of the random input."),
    stride: float = typer.Option(2.0, min=0.5, max=16.0, help="Continuous stride s of the layer."),
) -> None:
    """Run one DynOPool layer on a random input and print the shapes (a quick sanity check)."""
    import torch

    from dynopool_convert import DynOPool

    pool = DynOPool(stride)
    x = torch.randn(2, 8, size, size)
    y = pool(x)
    y.sum().backward()
    typer.echo(f"input {tuple(x.shape)} -> output {tuple(y.shape)}; r = {pool.r}; d(sum)/ds = {pool.stride.grad.tolist()}")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _usage_message(err: UsageError) -> str:
    """Click's message in one line, without the "Value error, " that typer's pydantic
    validation puts before a choice error ("Value error, 'pdf' is not one of ...")."""
    return re.sub(r"(^|: )Value error, ", r"\1", _one_line(err.format_message()))


def _user_errors() -> tuple[type[BaseException], ...]:
    """``UserInputError`` once a command has imported the library; before that none can be raised."""
    errors = sys.modules.get("dynopool_convert.errors")
    return (errors.UserInputError,) if errors is not None else ()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    Usage errors (unknown options, bad values) and ``UserInputError`` from the library print
    one line to stderr and exit with code 2, without a traceback. OpenMP threads are made
    to sleep when idle unless ``OMP_WAIT_POLICY`` is set (``threads.quiet_thread_pools``).
    """
    quiet_thread_pools()  # before any command imports torch
    try:
        code = app(args=argv, standalone_mode=False)
    except NoArgsIsHelpError:
        app(args=["--help"], standalone_mode=False)
        sys.exit(0)
    except UsageError as err:
        hint = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        typer.echo(f"Error: {_usage_message(err)}{hint}", err=True)
        sys.exit(2)
    except _user_errors() as err:  # evaluated when an error reaches it: after the command's imports
        typer.echo(f"Error: {_one_line(str(err))}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


# Commands live in their own modules (the CLI only parses, calls the library and renders).
from .threads import quiet_thread_pools  # noqa: E402
from .convert_cmd import convert  # noqa: E402
from .finetune_cmd import finetune  # noqa: E402
from .report_cmd import report  # noqa: E402
from .export_cmd import export  # noqa: E402

for _command in (convert, finetune, report, export):
    app.command()(_command)
