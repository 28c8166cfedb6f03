"""Entry point: global options, command registration, and the one place errors become exit codes."""

from __future__ import annotations

import os
import signal
import sys
import traceback

import click

from loraformat import __version__
from loraformat.cli.common import Settings
from loraformat.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, LoraformatError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="loraformat")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no human-readable chatter.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """loraformat: self-describing LoRA adapters — validate, inspect, convert, hash, merge, compose, share.

    \b
    Example:
      loraformat validate adapter.safetensors --base ./base-model
      loraformat merge ./base-model adapter.safetensors -o ./merged

    Exit codes: 0 ok, 1 invalid input or findings, 2 usage or I/O error, 3 hub: not found,
    4 hub: authentication, 5 hub: network or offline, 70 internal error, 130 interrupted.
    """
    ctx.obj = Settings(quiet=quiet, debug=debug)


def _register() -> None:
    from loraformat.cli import adapters, check, compose, extract, hub, merge

    for module in (check, adapters, merge, extract, compose, hub):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _one_line(exc: BaseException) -> str:
    """An error message on one line, whatever the exception carried (library messages often span lines)."""
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or bool(os.environ.get("LORAFORMAT_DEBUG"))
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. embedded use)
        pass
    try:
        code = cli.main(args=args, prog_name="loraformat", standalone_mode=False)
    except LoraformatError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("error: interrupted; nothing partial was left behind", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # the last line of defence: one line, not a traceback
        if debug:
            traceback.print_exc()
        click.echo(
            f"error: internal error: {exc.__class__.__name__}: {_one_line(exc)} (rerun with --debug)",
            err=True,
        )
        sys.exit(EXIT_INTERNAL)
    sys.exit(code if isinstance(code, int) else 0)
