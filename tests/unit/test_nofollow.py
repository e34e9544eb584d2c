"""chmod_socket never changes the mode of what a planted symlink points at."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from sockherd._nofollow import chmod_socket


def test_a_socket_gets_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        chmod_socket(path, 0o660)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660


@pytest.mark.parametrize("planted", ["symlink to a file", "symlink to a socket", "file"])
def test_anything_else_is_refused_and_left_alone(tmp_path: Path, planted: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    other = tmp_path / "other.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(other))
    other.chmod(0o600)
    path = tmp_path / "app.0-abcdef.sock"
    if planted == "symlink to a file":
        path.symlink_to(secret)
    elif planted == "symlink to a socket":
        path.symlink_to(other)
    else:
        path.write_text("")
    try:
        with pytest.raises(OSError, match="refusing to change the mode"):
            chmod_socket(path, 0o666)
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(other.stat().st_mode) == 0o600
    finally:
        holder.close()
