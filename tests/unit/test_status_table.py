"""The status table (sockherd/status_table.py): human units, `-` for what was not measured,
colour only when asked, warnings under the table; and the module stays cheap to import."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from typing import Any

import pytest

from sockherd.status_table import PLAIN, WATCH, colour_wanted, format_status, human_bytes, worker_table

WARNING = "worker #0 (0-abcdef, pid 42) listens with a backlog of 5, far below backlog = 2048: …"


def worker(**fields: Any) -> dict[str, Any]:
    row = {
        "id": "0-abcdef",
        "pid": 42,
        "index": 0,
        "state": "online",
        "generation": 2,
        "started_at": time.time() - 75,
        "restarts": 1,
        "symlink": "/run/app/app.0.sock",
        "rss": 50_541_363,
        "cpu": 0.34,
        "queued": 0,
        "backlog": 2048,
        "warning": None,
    }
    return {**row, **fields}


def status(*workers: dict[str, Any], **daemon: Any) -> dict[str, Any]:
    d = {"name": "app", "pid": 1, "state": "running", "generation": 2, "workers": 1, "started_at": time.time()}
    return {"daemon": {**d, **daemon}, "workers": list(workers), "slots": []}


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "-"),
        (0, "-"),  # the daemon's figure for a process it could not read
        (512, "512B"),
        (2048, "2.0KiB"),
        (50_541_363, "48.2MiB"),
        (3 << 30, "3.0GiB"),
    ],
)
def test_bytes_in_human_units(value: int | None, shown: str) -> None:
    assert human_bytes(value) == shown


def test_the_plain_table_keeps_its_columns_and_adds_memory_and_cpu_at_the_end() -> None:
    header, row = format_status(status(worker())).splitlines()[1:]
    assert header.split() == ["ID", "PID", "INDEX", "STATE", "GEN", "UPTIME", "RESTARTS", "SYMLINK", "RSS", "CPU"]
    assert row.split() == ["0-abcdef", "42", "0", "online", "2", "1m15s", "1", "app.0.sock", "48.2MiB", "0.3%"]
    assert header.index("RSS") == row.index("48.2MiB"), "the columns line up"


def test_what_was_not_measured_is_a_dash() -> None:
    spawning = worker(pid=None, state="spawning", rss=0, cpu=0.0, symlink=None)
    unknown = worker(id="1-abcdef", index=1, rss=None, cpu=None)
    lines = format_status(status(spawning, unknown)).splitlines()
    assert lines[2].split()[-3:] == ["-", "-", "-"]  # symlink, rss, cpu
    assert lines[3].split()[-2:] == ["-", "-"]


def test_warnings_are_printed_under_the_table() -> None:
    lines = format_status(status(worker(warning=WARNING), worker(id="1-abcdef", index=1))).splitlines()
    assert lines[4:] == [f"! {WARNING}"]


def test_no_escapes_unless_colour_is_asked_for() -> None:
    broken = worker(id="1-abcdef", state="broken", broken_reason="pool exhausted", warning=WARNING)
    crashing = {"index": 1, "crash_loop": 4, "next_attempt_at": time.time() + 5, "restarts": 4}
    plain = {**status(worker(), worker(state="suspended"), broken), "slots": [crashing]}
    assert "\x1b" not in format_status(plain)
    coloured = format_status(plain, colour=True).splitlines()
    assert "\x1b[32monline\x1b[0m " in coloured[2]
    assert "\x1b[33msuspended\x1b[0m " in coloured[3]
    assert "\x1b[31mbroken (pool exhausted)\x1b[0m " in coloured[4]
    assert coloured[5] == f"\x1b[33m! {WARNING}\x1b[0m"
    assert coloured[6].startswith("\x1b[31mslot 1: crash loop (4 in a row)")


def test_colour_keeps_the_columns_aligned() -> None:
    rows = status(worker(), worker(id="1-abcdef", index=1, state="terminating"))
    plain = format_status(rows).splitlines()
    coloured = format_status(rows, colour=True).splitlines()
    stripped = [line.replace("\x1b[32m", "").replace("\x1b[33m", "").replace("\x1b[0m", "") for line in coloured]
    assert stripped == plain


def test_the_watch_view_shares_the_cells_and_adds_the_listen_queue() -> None:
    lines = worker_table(status(worker(queued=None, backlog=None)), WATCH, colour=False)
    assert lines[0].split() == list(WATCH)
    assert lines[1].split()[-4:] == ["48.2MiB", "0.3%", "-", "-"]
    assert set(PLAIN) - set(WATCH) == {"UPTIME", "RESTARTS", "SYMLINK"}


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("tty", "no_color", "wanted"),
    [(True, None, True), (True, "1", False), (True, "", True), (False, None, False)],
)
def test_colour_only_on_a_terminal_without_no_color(
    monkeypatch: pytest.MonkeyPatch, tty: bool, no_color: str | None, wanted: bool
) -> None:
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)  # https://no-color.org: set and not empty
    assert colour_wanted(Stream(tty)) is wanted


def test_importing_it_imports_nothing_heavy() -> None:
    """The CLI's fast path imports it: no typing, dataclasses, argparse, pathlib or asyncio."""
    code = "import sys; before = set(sys.modules); import sockherd.status_table; print(*set(sys.modules) - before)"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert "sockherd.status_table" in loaded
    assert not loaded & {"typing", "dataclasses", "argparse", "pathlib", "asyncio", "json", "re", "collections"}
