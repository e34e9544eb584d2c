"""tmp_dir held by descriptor, and the published symlinks watched.

At start the daemon checks tmp_dir (publish.prepare_tmp_dir) and opens it with
``O_DIRECTORY | O_NOFOLLOW``. From then on it creates, renames and removes symlinks
relative to that descriptor, and before each publish it checks that the path still
names the same directory: a tmp_dir renamed away and replaced (by whoever could) is
refused, never published into. inotify on the held directory reports any change to a
published symlink; one that no longer points where the daemon put it is put back, with
a warning: no other process may redirect nginx's traffic while ``status`` still shows
the worker.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("sockherd")

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
IN_CREATE, IN_DELETE, IN_MOVED_FROM, IN_MOVED_TO = 0x100, 0x200, 0x40, 0x80
IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")


class TmpDirReplaced(OSError):
    """tmp_dir no longer names the directory the daemon checked and holds."""


class TmpDir:
    """The checked tmp_dir, held open; ``fd`` for ``dir_fd=`` calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        self._identity = (st.st_dev, st.st_ino)

    def verify(self) -> None:
        """Raise TmpDirReplaced unless ``path`` still names the held directory."""
        try:
            st = os.lstat(self.path)
            same = not stat.S_ISLNK(st.st_mode) and (st.st_dev, st.st_ino) == self._identity
        except OSError:
            same = False
        if not same:
            raise TmpDirReplaced(
                errno.ESTALE,
                f"tmp_dir {self.path} is no longer the directory this daemon checked at start (renamed away or "
                "replaced); refusing to publish into it: restart the daemon after checking who did it",
            )

    def close(self) -> None:
        os.close(self.fd)


class LinkWatch:
    """inotify on the held tmp_dir: calls ``on_change(name)`` for every entry created,
    removed or renamed there (the daemon's own publishes included)."""

    def __init__(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change
        self._fd: int | None = None

    def start(self, loop: asyncio.AbstractEventLoop, tmp_dir: TmpDir) -> bool:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.warning(
                "inotify unavailable (%s): published symlinks are checked at each operation only",
                os.strerror(ctypes.get_errno()),
            )
            return False
        mask = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
        where = f"/proc/self/fd/{tmp_dir.fd}".encode()
        if libc.inotify_add_watch(fd, where, mask) < 0:
            log.warning("cannot watch %s: %s", tmp_dir.path, os.strerror(ctypes.get_errno()))
            os.close(fd)
            return False
        self._fd = fd
        loop.add_reader(fd, self._read)
        return True

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._fd is not None:
            loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def _read(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        names: set[str] = set()
        offset = 0
        while offset + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                names.add("")  # events were lost: check everything
            elif raw:
                names.add(os.fsdecode(raw.rstrip(b"\0")))
        for name in sorted(names):
            try:
                self._on_change(name)
            except Exception:
                log.exception("checking %s after a change in tmp_dir failed", name or "every symlink")
