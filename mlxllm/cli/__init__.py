"""The ``mlxllm`` command line: generate, chat, serve, info, bench, convert, perplexity, lora, fuse, distill.

Every user mistake ends as one ``error: ...`` line on stderr and a nonzero exit; tracebacks only with
``--verbose``. This module holds the group, that error handler (``main``, the entry point) and the
registration of the commands, which live by topic in ``generation``, ``serve``, ``models``, ``measure``
and ``training``; the options they share are declared once in ``options``.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from .. import backend
from ..errors import UserError
from .generation import chat_command, generate_command
from .measure import bench_command, perplexity_command
from .models import convert_command, fuse_command, info_command
from .serve import serve_command
from .training import distill_command, lora_command


@click.group("cli", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxllm")
def cli_group() -> None:
    """Run open LLMs with MLX: GGUF and Hugging Face models, exact tokenizers, fast generation."""


# ``from mlxllm.cli import cli`` is how callers reach the group; the function itself is named apart from
# the package, so that no function in mlxllm shares a name with one of its modules.
cli = cli_group

for _command in (generate_command, chat_command, info_command, bench_command, convert_command, perplexity_command,
                 lora_command, fuse_command, distill_command, serve_command):
    cli.add_command(_command)
del _command


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every failure into one line unless --verbose."""
    args = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in args or "-v" in args
    group = backend.rank_group()
    if group is not None and group.rank() > 0:  # under mlx.launch every rank runs the command; rank 0 speaks
        sys.stdout = open(os.devnull, "w")
    try:
        code = cli.main(args=args, prog_name="mlxllm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except UserError as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # a bug, an unexpected environment problem, or a native extension's panic
        if verbose:
            traceback.print_exc()
        message = str(e).splitlines()[0] if str(e).strip() else ""
        click.echo(f"error: {type(e).__name__}: {message} (run with --verbose for the traceback)", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
