"""Where a shared listener comes from: bound, inherited, activated, or taken back (real sockets)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sockherd.daemon.listeners import (
    Listener,
    ListenerError,
    canonical_address,
    open_listeners,
    recover_from_workers,
    take_activated,
)


def tcp_listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def address_of(sock: socket.socket) -> str:
    return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_canonical_addresses_spell_what_listen_accepts(tmp_path: Path) -> None:
    with tcp_listener() as tcp:
        assert canonical_address(tcp) == address_of(tcp)
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as v6:
        assert canonical_address(v6) == f"tcp://[::1]:{v6.getsockname()[1]}"
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(tmp_path / "a.sock"))
        assert canonical_address(unix) is None  # bound but not listening: not a listener
        unix.listen()
        assert canonical_address(unix) == f"unix://{tmp_path / 'a.sock'}"


def test_names_have_no_separator_systemd_forbids() -> None:
    with tcp_listener() as sock:
        item = Listener("tcp://[::1]:8000", sock, "bound")
        assert item.name == "tcp-[--1]-8000"
        assert ":" not in Listener("unix:///run/a b:c.sock", sock, "bound").name


def test_activated_sockets_are_taken_only_when_listen_pid_is_ours() -> None:
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "x"}
    assert take_activated(environ) == []
    assert environ == {}, "the variables are removed either way: workers get their own"


def test_an_activated_socket_is_matched_by_address_and_preferred_to_a_bind() -> None:
    activated = tcp_listener()
    stranger = tcp_listener()
    address = address_of(activated)
    listeners = open_listeners([address], backlog=16, mode=0o660, gid=None, activated=[activated, stranger])
    try:
        (item,) = listeners.items
        assert (item.origin, item.sock) == ("systemd", activated)
        assert stranger.fileno() == -1, "a socket that matches no `listen` entry is closed"
    finally:
        listeners.close()


def test_with_listen_empty_every_activated_socket_is_a_listener() -> None:
    sockets = [tcp_listener(), tcp_listener()]
    listeners = open_listeners([], backlog=16, mode=0o660, gid=None, activated=sockets)
    try:
        assert [i.address for i in listeners.items] == [address_of(s) for s in sockets]
        assert listeners.environment()["LISTEN_FDS"] == "2"
    finally:
        listeners.close()


def test_a_bound_unix_listener_gets_its_mode_and_is_removed_at_close(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    listeners = open_listeners([f"unix://{path}"], backlog=16, mode=0o660, gid=None)
    assert oct(path.stat().st_mode & 0o777) == oct(0o660)
    listeners.close()
    assert not path.exists()


def test_close_leaves_a_file_that_replaced_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    listeners = open_listeners([f"unix://{path}"], backlog=16, mode=0o660, gid=None)
    path.unlink()
    path.write_text("someone else's")
    listeners.close()
    assert path.read_text() == "someone else's"


def test_a_symlink_at_a_unix_listener_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("x")
    (tmp_path / "app.sock").symlink_to(tmp_path / "target")
    with pytest.raises(ListenerError, match="exists and is not a socket; refusing to touch it"):
        open_listeners([f"unix://{tmp_path / 'app.sock'}"], backlog=16, mode=0o660, gid=None)
    assert (tmp_path / "target").read_text() == "x"


def test_a_socket_is_taken_back_from_a_process_that_holds_it() -> None:
    """What a daemon started after a crash does: pidfd_getfd on the socket's inode."""
    original = tcp_listener()
    inode = os.fstat(original.fileno()).st_ino
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)"],
        pass_fds=[original.fileno()],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
        address = address_of(original)
        original.close()  # from now on only the holder has it
        recovered = recover_from_workers(inode, [holder.pid])
        assert recovered is not None
        assert os.fstat(recovered.fileno()).st_ino == inode
        assert canonical_address(recovered) == address
        listeners = open_listeners(
            [address], backlog=16, mode=0o660, gid=None, recorded={address: inode}, holders=[holder.pid]
        )
        assert [i.origin for i in listeners.items] == ["recovered"]
        listeners.close()
        recovered.close()
    finally:
        holder.kill()
        holder.communicate()
