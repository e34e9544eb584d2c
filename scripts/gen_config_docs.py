"""Rewrite the key reference in docs/config.md from sockherd's settings table.

The table lives between ``<!-- settings:start -->`` and ``<!-- settings:end -->`` and is
generated from ``sockherd.config_settings.SETTINGS``, the same definitions the loader
validates with, so the docs cannot drift from the code. ``--check`` only reports (exit 1)
when the file is out of date, for CI; a unit test asserts the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sockherd.config_settings import settings_table

START = "<!-- settings:start -->"
END = "<!-- settings:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def render(text: str) -> str:
    """``text`` with the region between the markers replaced by the generated table."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"markers {START} and {END} not found")
    return f"{head}{START}\n{settings_table()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rewrite the key reference in docs/config.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the docs are out of date, write nothing")
    parser.add_argument("path", nargs="?", type=Path, default=DOC)
    args = parser.parse_args(argv)
    text = args.path.read_text()
    try:
        new = render(text)
    except ValueError as exc:
        print(f"{args.path}: {exc}", file=sys.stderr)
        return 2
    if new == text:
        return 0
    if args.check:
        print(f"{args.path} is out of date: run scripts/gen_config_docs.py", file=sys.stderr)
        return 1
    args.path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
