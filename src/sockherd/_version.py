"""The installed sockherd's version, read without importlib.metadata.

``importlib.metadata`` costs about as much as everything else the CLI imports (email,
zipfile, …), and every ``sockherd status`` would pay it for one string. This reads the
``Version:`` header of the first ``sockherd-*.dist-info`` on ``sys.path``, which is
where importlib.metadata would find it too, and falls back to importlib.metadata for
anything unusual (an egg, a zip).
"""

from __future__ import annotations

import os
import sys


def installed_version() -> str:
    for entry in sys.path:
        base = entry or "."
        try:
            names = sorted(n for n in os.listdir(base) if n.startswith("sockherd-") and n.endswith(".dist-info"))
        except OSError:
            continue
        for name in names:
            found = _version_header(os.path.join(base, name, "METADATA"))
            if found is not None:
                return found
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sockherd")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0"


def _version_header(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("Version:"):
                    return line.partition(":")[2].strip()
                if not line.strip():  # end of the headers
                    return None
    except OSError:
        return None
    return None
