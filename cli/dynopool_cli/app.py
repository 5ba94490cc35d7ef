"""Typer application: parses, calls the library, renders. Commands live in their own modules.

Errors: the library raises ``UserInputError`` for anything the user can fix; ``main`` prints
its one-line message to stderr and exits with code 2, without a traceback.
"""
from __future__ import annotations

import sys

import typer

try:  # recent typer vendors click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import NoArgsIsHelpError, UsageError

from dynopool_convert.errors import UserInputError, one_line

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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    Usage errors (unknown options, bad values) and ``UserInputError`` from the library print
    one line to stderr and exit with code 2, without a traceback.
    """
    try:
        code = app(args=argv, standalone_mode=False)
    except NoArgsIsHelpError:
        app(args=["--help"], standalone_mode=False)
        sys.exit(0)
    except UsageError as err:
        hint = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        typer.echo(f"Error: {one_line(err.format_message())}{hint}", err=True)
        sys.exit(2)
    except UserInputError as err:
        typer.echo(f"Error: {one_line(str(err))}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


# Commands live in their own modules (the CLI only parses, calls the library and renders).
from .convert_cmd import convert  # noqa: E402
from .export_cmd import export  # noqa: E402
from .finetune_cmd import finetune  # noqa: E402
from .report_cmd import report  # noqa: E402

for _command in (convert, finetune, report, export):
    app.command()(_command)
