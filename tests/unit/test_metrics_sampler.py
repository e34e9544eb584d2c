"""The status figures read from /proc: a real process family, checked against psutil's view."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_a_gone_process_has_no_figures() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert Sampler().usage(proc.pid) == (0, 0.0)
    assert Sampler().usage(None) == (0, 0.0)
