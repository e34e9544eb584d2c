"""The status figures read from /proc: a real process family, checked against psutil's view."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from sockherd.daemon.metrics import Sampler, _family


@pytest.fixture
def family() -> Iterator[psutil.Process]:
    # Each level starts the next with the same program, from the environment (a worker's
    # family), and says "ready" on the shared stdout pipe once it only sleeps: its memory
    # no longer grows, so two reads a moment apart agree.
    code = (
        "import os, subprocess, sys, time\n"
        "depth = int(sys.argv[1])\n"
        "if depth: subprocess.Popen([sys.executable, '-c', os.environ['FAMILY_CODE'], str(depth - 1)])\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "2"], env={**os.environ, "FAMILY_CODE": code}, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for _ in range(3):
        assert proc.stdout.readline() == "ready\n"
    root = psutil.Process(proc.pid)
    yield root
    for p in [root, *root.children(recursive=True)]:
        p.kill()
    proc.wait()
    proc.stdout.close()


def test_the_family_is_the_process_and_everything_below_it(family: psutil.Process) -> None:
    expected = {family.pid, *(p.pid for p in family.children(recursive=True))}
    assert len(expected) == 3
    assert set(_family(family.pid)) == expected


def test_rss_is_the_familys_and_cpu_a_percentage(family: psutil.Process) -> None:
    sampler = Sampler()
    rss, cpu = sampler.usage(family.pid)
    members = [family, *family.children(recursive=True)]
    expected = sum(p.memory_info().rss for p in members)
    assert abs(rss - expected) <= 0.05 * expected  # the same pages, read a moment apart
    # The first figure is each process's lifetime average: a single-threaded interpreter
    # that has just started can be near one core each (three of them, 200 % and more).
    assert 0.0 <= cpu <= 100.0 * len(members) + 1.0
    sampler.forget_unseen()
    rss2, cpu2 = sampler.usage(family.pid)  # the second round: since the first, and they sleep
    assert rss2 > 0 and cpu2 < 50.0


def test_cpu_is_the_share_of_a_core_the_family_spent() -> None:
    """A worker whose child spins shows it: the lifetime average on the first round, then
    the share since the round before, and near zero once it has been idle since. The child
    spins in the kernel (reading /dev/zero), so user time alone would not show it. (The
    family above only sleeps: near zero either way.)"""
    spinner = (
        "import sys, time\n"
        "zero = open('/dev/zero', 'rb', buffering=0)\n"
        "def spin(seconds):\n"
        "    end = time.process_time() + seconds\n"
        "    while time.process_time() < end: zero.read(1 << 20)\n"
        "spin(0.3); print('spun', flush=True)\n"
        "sys.stdin.readline(); spin(0.3); print('spun', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    worker = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', sys.argv[1]]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", worker, spinner], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "spun\n"
        sampler = Sampler()
        _, lifetime = sampler.usage(proc.pid)  # 0.3 s of CPU in a life not much longer
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "spun\n"
        sampler.forget_unseen()
        _, since = sampler.usage(proc.pid)  # 0.3 s of CPU since the first round
        # A share of one core, well above zero even on a machine busy enough to halve it;
        # at most one core, give or take the kernel's clock ticks (10 ms in a 0.3 s window).
        assert 20.0 < lifetime <= 110.0 and 20.0 < since <= 110.0, (lifetime, since)
        time.sleep(0.3)  # a window in which the family does nothing: what the next round measures
        sampler.forget_unseen()
        _, idle = sampler.usage(proc.pid)
        assert idle < 10.0, idle  # since the second round, not since the first
    finally:
        for member in psutil.Process(proc.pid).children(recursive=True):
            member.kill()
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_a_gone_process_has_no_figures() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert Sampler().usage(proc.pid) == (0, 0.0)
    assert Sampler().usage(None) == (0, 0.0)
