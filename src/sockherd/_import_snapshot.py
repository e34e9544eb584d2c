"""What a warm spare fork server has loaded, and whether the disk still agrees with it.

A spare (``sockherd.preload.warm_point``) starts the interpreter and the server's own
imports (uvicorn, sockherd, asyncio) ahead of the next deploy, so that a deploy pays only
for the app's import. That is gunicorn's ``HUP``-with-``--preload`` problem waiting to
happen: a deploy that also ran ``pip install -U uvicorn`` must not be served by the
uvicorn that was in memory before. So when the deploy comes, the spare compares what it
loaded with what is on disk now, and any difference sends the deploy down the cold path
(a fresh interpreter), which costs what it always did:

- every imported module's file (mtime, size, inode: pip writes new files, so a replaced
  file has a new inode even when size and mtime collide),
- the interpreter's executable,
- the ``.pth`` files of the site directories (an editable install, a new path hook),
- the working directory: the config's ``cwd`` resolved again (a ``current`` symlink
  flipped to another release means another tree, and usually another virtualenv),
- where the main script and every ``sys.path`` entry lead now (``python
  /srv/current/run.py`` after the flip is another release's script even when the file is
  a hard link to the same inode, and ``PYTHONPATH=/srv/current/lib`` another library).

The app's own modules are not in the snapshot: the spare imports them after the check,
once :func:`importlib.invalidate_caches` has dropped what the import system remembers of
directories (a path entry that did not exist yet, a zip file's old table of contents).
"""

from __future__ import annotations

import os
import site
import sys
from dataclasses import dataclass

__all__ = ["ImportSnapshot"]

_FileId = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)


def _file_id(path: str) -> _FileId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _site_dirs() -> list[str]:
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE and site.USER_SITE:
        dirs.append(site.USER_SITE)
    return [d for d in dirs if os.path.isdir(d)]


def _pth_files() -> dict[str, _FileId | None]:
    found: dict[str, _FileId | None] = {}
    for directory in _site_dirs():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.endswith(".pth"):
                path = os.path.join(directory, name)
                found[path] = _file_id(path)
    return found


def _resolved_paths() -> dict[str, str]:
    """The main script and each sys.path entry, as given -> where it leads now."""
    given = [p for p in sys.path if isinstance(p, str)]
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if isinstance(main_file, str):
        given.append(main_file)
    return {p: os.path.realpath(p or ".") for p in given}


@dataclass(frozen=True, slots=True)
class ImportSnapshot:
    modules: dict[str, _FileId]  # module file -> its identity when the snapshot was taken
    executable: _FileId | None
    pth_files: dict[str, _FileId | None]
    cwd: str
    resolved: dict[str, str]  # main script and sys.path entries -> their real paths

    @classmethod
    def take(cls) -> ImportSnapshot:
        modules: dict[str, _FileId] = {}
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if isinstance(path, str) and path not in modules and (identity := _file_id(path)) is not None:
                modules[path] = identity
        return cls(modules, _file_id(sys.executable), _pth_files(), os.getcwd(), _resolved_paths())

    def changed(self) -> str | None:
        """Why what is loaded no longer matches the disk (None: it still does). The working
        directory is compared as it is now: the caller changes into the config's ``cwd``
        first, which resolves a symlinked release directory again."""
        if os.getcwd() != self.cwd:
            return f"the working directory is now {os.getcwd()}, not {self.cwd}"
        if _file_id(sys.executable) != self.executable:
            return f"the interpreter {sys.executable} changed"
        for given, real in self.resolved.items():
            if (now := os.path.realpath(given or ".")) != real:
                return f"{given or '.'} now leads to {now}, not {real}"
        for path, identity in self.modules.items():
            if _file_id(path) != identity:
                return f"{path} changed"
        if _pth_files() != self.pth_files:
            return "the .pth files of the site directories changed"
        return None
