"""The ``sockherd`` command run both ways, for the tests that hold its fast path
(sockherd.cli_fast) to the full CLI's output and keep it light."""

from __future__ import annotations

import subprocess
import sys

# What the fast path must not import: the full CLI's start-up, which it exists to avoid.
HEAVY = (
    "argparse",
    "dataclasses",
    "socket",
    "asyncio",
    "tomllib",
    "sockherd.cli",
    "sockherd.config",
    "sockherd.client",
)


def sockherd_argv(*args: str, full: bool = False) -> list[str]:
    """``sockherd ARGS`` through the console script's entry point, or straight through the full CLI."""
    entry = "from sockherd.cli import main" if full else "from sockherd.cli_fast import main"
    return [sys.executable, "-c", f"import sys; {entry}; sys.argv[0] = 'sockherd'; raise SystemExit(main())", *args]


def fast_path_imports(*args: str) -> str:
    """The stderr of a fresh interpreter in which the fast path ran ``sockherd ARGS``: what
    the command wrote there, then a last line ``EXIT [HEAVY modules it imported]``."""
    code = (
        "import sys; from sockherd.cli_fast import run; "
        f"code = run({list(args)!r}); "
        f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return result.stderr.strip()
