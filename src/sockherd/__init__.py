"""sockherd: keep a web application serving while its workers come and go."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sockherd")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
