"""``python -m nctools`` (and ``torchrun -m nctools``) runs the command line."""

from nctools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
