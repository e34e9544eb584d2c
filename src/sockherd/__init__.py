"""sockherd: keep a web application serving while its workers come and go."""

from __future__ import annotations

__all__ = ["__version__"]

__version__: str  # read on first use (see _version.py): the CLI starts faster without it


def __getattr__(name: str) -> str:
    if name == "__version__":
        from sockherd._version import installed_version

        value = installed_version()
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
