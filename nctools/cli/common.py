"""What every ``nctools`` command shares: the one-line argparse, the help example, ``--out``."""

from __future__ import annotations

import argparse
from typing import NoReturn

from nctools.errors import NctoolsError

FORMATTER = argparse.RawDescriptionHelpFormatter


class UsageError(NctoolsError):
    """Arguments argparse refuses (missing, unknown, badly typed)."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line like every other nctools error (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def epilog(*lines: str) -> str:
    """The ``example:`` block at the end of a command's ``--help``."""
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def add_command(sub, name: str, help: str, *examples: str) -> argparse.ArgumentParser:
    """A subcommand parser with its one-line help and its examples."""
    return sub.add_parser(name, help=help, formatter_class=FORMATTER, epilog=epilog(*examples))


def add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable), gathered in ``args.overrides``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help=help)


def check_out(out: str | None, meta: str = "RUN") -> None:
    """An empty ``--out`` is a mistake (an unset shell variable), not the default."""
    if out is not None and not out.strip():
        raise NctoolsError(f"--out: empty path; give a {meta}, or leave --out out for the "
                           "default")
