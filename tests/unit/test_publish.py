"""Atomic symlink publishing and the tmp_dir sweep, on a real filesystem."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from sockherd.daemon.publish import (
    SocketNames,
    TmpDirError,
    prepare_tmp_dir,
    publish_symlink,
    socket_is_live,
    sweep_tmp_dir,
    unpublish_symlink,
)

NAMES = SocketNames.from_pattern("app.{worker}.sock")


def test_publish_is_a_rename_over_the_old_link(tmp_path: Path) -> None:
    link = tmp_path / "app.0.sock"
    publish_symlink(link, tmp_path / "app.0-aaaaaa.sock")
    inode_before = os.lstat(link).st_ino
    publish_symlink(link, tmp_path / "app.0-bbbbbb.sock")
    assert os.readlink(link) == "app.0-bbbbbb.sock"
    assert os.lstat(link).st_ino != inode_before, "a new link renamed over the old one, not rewritten"
    assert sorted(os.listdir(tmp_path)) == ["app.0.sock"], "no temporary name is left behind"


def test_absolute_symlinks_on_request(tmp_path: Path) -> None:
    link = tmp_path / "app.0.sock"
    publish_symlink(link, tmp_path / "app.0-aaaaaa.sock", relative=False)
    assert os.readlink(link) == str(tmp_path / "app.0-aaaaaa.sock")


def test_a_leftover_temporary_name_does_not_block_the_slot(tmp_path: Path) -> None:
    # Nodesockd used a fixed temp name: one crash mid-swap and every later symlink()
    # failed with EEXIST. Here names are random, so leftovers (even many) never block.
    for n in range(50):
        os.symlink("nowhere", tmp_path / f".app.0.sock.{n:08x}")
    publish_symlink(tmp_path / "app.0.sock", tmp_path / "app.0-cccccc.sock")
    assert os.readlink(tmp_path / "app.0.sock") == "app.0-cccccc.sock"


def test_readers_never_see_a_missing_link_during_swaps(tmp_path: Path) -> None:
    link = tmp_path / "app.0.sock"
    publish_symlink(link, tmp_path / "a")
    stop = threading.Event()
    missing: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                os.readlink(link)
            except FileNotFoundError:
                missing.append("gone")

    thread = threading.Thread(target=reader)
    thread.start()
    for n in range(2000):
        publish_symlink(link, tmp_path / ("a" if n % 2 else "b"))
    stop.set()
    thread.join()
    assert missing == []


def test_unpublish_removes_only_a_symlink(tmp_path: Path) -> None:
    regular = tmp_path / "app.0.sock"
    regular.write_text("not a link")
    unpublish_symlink(regular)
    assert regular.exists()
    unpublish_symlink(tmp_path / "app.9.sock")  # absent: fine


def test_names_are_recognised_from_the_pattern() -> None:
    assert NAMES.is_symlink_name("app.0.sock") and NAMES.is_symlink_name("app.12.sock")
    assert not NAMES.is_symlink_name("app.x.sock")
    assert NAMES.is_worker_socket_name("app.0-3fa9c1.sock") and NAMES.is_worker_socket_name("app.s-3fa9c1.sock")
    assert not NAMES.is_worker_socket_name("app.0.sock")
    assert NAMES.is_temp_name(".app.0.sock.deadbeef")
    assert not NAMES.is_temp_name(".app.0.sock.nothex!!")
    assert not NAMES.is_temp_name(".bashrc.deadbeef")


def _dead_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


def test_sweep_keeps_live_sockets_and_links_to_them(tmp_path: Path) -> None:
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "app.0-aaaaaa.sock"))
    live.listen()
    try:
        os.symlink("app.0-aaaaaa.sock", tmp_path / "app.0.sock")
        _dead_socket(tmp_path / "app.1-bbbbbb.sock")
        os.symlink("app.1-bbbbbb.sock", tmp_path / "app.1.sock")
        os.symlink("gone.sock", tmp_path / "app.2.sock")
        removed = sweep_tmp_dir(tmp_path, NAMES)
        assert sorted(removed) == ["app.1-bbbbbb.sock", "app.1.sock", "app.2.sock"]
        assert socket_is_live(tmp_path / "app.0.sock")
    finally:
        live.close()


def test_sweep_never_follows_a_symlink_out_of_tmp_dir(tmp_path: Path) -> None:
    tmp_dir = tmp_path / "run"
    tmp_dir.mkdir()
    victim = tmp_path / "victim.sock"
    _dead_socket(victim)
    os.symlink(str(victim), tmp_dir / "app.0.sock")
    os.symlink(str(victim), tmp_dir / "app.0-aaaaaa.sock")  # a link where a worker socket goes
    sweep_tmp_dir(tmp_dir, NAMES)
    assert stat.S_ISSOCK(os.lstat(victim).st_mode), "the file outside tmp_dir is untouched"
    assert not (tmp_dir / "app.0.sock").is_symlink()
    assert (tmp_dir / "app.0-aaaaaa.sock").is_symlink(), "not a socket: not ours to judge"


def test_prepare_tmp_dir_creates_and_refuses_unsafe_dirs(tmp_path: Path) -> None:
    fresh = tmp_path / "a" / "b"
    prepare_tmp_dir(fresh)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o750
    world = tmp_path / "world"
    world.mkdir()
    os.chmod(world, 0o777)
    with pytest.raises(TmpDirError, match="writable by every user"):
        prepare_tmp_dir(world)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(TmpDirError, match=r"cannot create it|not a directory"):
        prepare_tmp_dir(a_file)
