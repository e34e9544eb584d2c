"""Changing a socket's mode without ever following a symlink planted at its name.

``chmod(2)`` follows symlinks, and Linux has no ``lchmod`` (``fchmodat`` with
``AT_SYMLINK_NOFOLLOW`` fails before kernel 6.6). In a directory other users can write
to (nginx's group, say), someone could swap a socket for a symlink between a check and
a chmod, and have a daemon running as root chmod a file of their choice. So the name is
opened once with ``O_PATH | O_NOFOLLOW`` (which refers to the link itself, if it is
one), the descriptor's file type is checked, and the mode is set through
``/proc/self/fd``, on exactly the inode that was checked.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def chmod_socket(path: str | Path, mode: int, gid: int | None = None) -> None:
    """Set ``mode`` (and group ``gid``) on the UNIX socket at ``path``; OSError if it is
    not one (a symlink, a file). The group is changed only if it differs: an owner may
    always keep a file's group, and give it only a group it belongs to."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
            raise OSError(errno.ENOTSOCK, f"refusing to change the mode of {path}: it is {what}")
        if gid is not None and st.st_gid != gid:
            os.chown(f"/proc/self/fd/{fd}", -1, gid)
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)
