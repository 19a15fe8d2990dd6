"""The ``nctools`` command (also ``python -m nctools``): one module per subcommand.

Usage::

    nctools demo                                              # CPU minutes, embedded data
    nctools train configs/papyan2020/mnist-resnet18.yaml --set train.epochs=3
    nctools analyze runs/mnist-convnet && nctools plot runs/mnist-convnet
    nctools measure --arch resnet18 --checkpoint model.pt --dataset cifar10 --json
    nctools configs show demo

Each command module has ``add_parser(sub)`` (its arguments and help example) and
``run(args) -> int``. Every user error (an :class:`~nctools.errors.NctoolsError`) ends the
command with one line ``nctools: error: MESSAGE`` on stderr and exit status 2, and a missing
optional library with one line naming the extra that installs it; Ctrl-C exits with 130.
Heavy imports (torch, pandas, matplotlib) happen inside ``run`` so that ``--help`` answers
at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from nctools.cli.common import FORMATTER, Parser, epilog
from nctools.errors import NctoolsError, missing_extra

# The subcommands in the order of `nctools --help`, each the module nctools.cli.<name>.
COMMANDS = ("train", "analyze", "plot", "sweep", "collect", "demo", "measure", "configs")


def command(name: str):
    """The module of the subcommand ``name``."""
    return importlib.import_module(f"nctools.cli.{name}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per job, each with an example in its help."""
    from nctools._version import __version__

    parser = Parser(
        prog="nctools",
        description="Measure neural collapse (Papyan, Han & Donoho, PNAS 2020).",
        epilog=epilog("nctools demo", "nctools train CONFIG && nctools analyze RUN"),
        formatter_class=FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"nctools {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        command(name).add_parser(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # One readable line per warning (e.g. a skipped snapshot), not a source excerpt.
    print(f"nctools: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    # The training loop's progress messages (TPT onset, resume, completion) go to stderr.
    logging.basicConfig(level=logging.INFO, format="nctools: %(message)s")
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            args = parser.parse_args(argv)
            return command(args.command).run(args)
        except BrokenPipeError:
            # `nctools analyze RUN | head -1`: the reader left; stop quietly, as Unix tools
            # do, and keep Python from complaining when it flushes stdout at exit
            _quiet_stdout()
            return 141  # 128 + SIGPIPE, the status of a tool the pipe ended
        except (NctoolsError, OSError) as exc:
            print(f"nctools: error: {error_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("nctools: interrupted", file=sys.stderr)
            return 130
        except ImportError as exc:  # an optional library: one line naming its extra
            extra = missing_extra(exc)
            if extra is None:
                raise
            print(f"nctools: {extra}", file=sys.stderr)
            return 2


def error_line(exc: Exception) -> str:
    """A user error or an OSError as one line.

    An OSError (a full disk, a folder where a file should be) is the machine's answer, not
    a bug in nctools: named in one line like the user errors.
    """
    text = str(exc)
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a descriptor (captured in tests)
        pass
