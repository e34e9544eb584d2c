"""The daemon's log formats: the classic text line, JSON lines, journald's priority prefix."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from sockherd.daemon import logformat
from sockherd.daemon.logformat import JsonFormatter, TextFormatter, journal_priority, logs_to_journal, worker_event


@dataclass
class FakeWorker:
    id: str = "0-abc123"
    index: int | None = 0
    pid: int | None = 4242
    generation: int = 3


def record(
    message: str,
    *args: object,
    level: int = logging.INFO,
    name: str = "sockherd",
    extra: Mapping[str, object] | None = None,
) -> logging.LogRecord:
    return logging.getLogger(name).makeRecord(name, level, "daemon.py", 1, message, args, None, extra=extra)


def test_json_line_of_a_worker_event_carries_the_workers_identity() -> None:
    worker = FakeWorker()
    rec = record("%s online after %.3fs", "worker #0", 0.25, extra=worker_event("online", worker))
    entry = json.loads(JsonFormatter().format(rec))
    assert entry == {
        "time": entry["time"],
        "level": "info",
        "event": "online",
        "message": "worker #0 online after 0.250s",
        "id": "0-abc123",
        "index": 0,
        "pid": 4242,
        "generation": 3,
    }
    assert list(entry)[:4] == ["time", "level", "event", "message"]
    assert datetime.fromisoformat(entry["time"]).timestamp() == pytest.approx(rec.created, abs=0.001)


def test_a_standby_has_a_null_index_and_extra_fields_follow() -> None:
    standby = FakeWorker(id="s-9f00aa", index=None)
    rec = record("x", extra=worker_event("promoted", standby, slot=1))
    entry = json.loads(JsonFormatter().format(rec))
    assert (entry["index"], entry["slot"], entry["id"]) == (None, 1, "s-9f00aa")


def test_event_fields_cannot_overwrite_the_fixed_keys() -> None:
    rec = record("real", extra=worker_event("exited", FakeWorker(), message="forged", level="forged"))
    entry = json.loads(JsonFormatter().format(rec))
    assert (entry["message"], entry["level"], entry["event"]) == ("real", "info", "exited")


def test_untagged_lines_are_log_events_or_named_after_their_logger() -> None:
    assert json.loads(JsonFormatter().format(record("daemon exits")))["event"] == "log"
    assert json.loads(JsonFormatter().format(record("slow callback", name="asyncio")))["event"] == "asyncio"


def test_a_traceback_stays_on_the_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.getLogger("sockherd").makeRecord(
            "sockherd", logging.ERROR, "x.py", 1, "handling %s failed", ("SIGHUP",), sys.exc_info()
        )
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["level"], entry["message"]) == ("error", "handling SIGHUP failed")
    assert entry["exception"].startswith("Traceback") and entry["exception"].endswith("ValueError: boom")


def test_text_lines_are_the_classic_format_whatever_the_tags() -> None:
    classic = logging.Formatter("%(asctime)s sockherd[%(process)d] %(levelname)s %(message)s")
    rec = record("published %s as %s", "worker #1", "app.1.sock", extra=worker_event("published", FakeWorker(index=1)))
    assert TextFormatter().format(rec) == classic.format(rec)
    assert TextFormatter().format(rec).endswith(f"sockherd[{os.getpid()}] INFO published worker #1 as app.1.sock")


@pytest.mark.parametrize(
    ("level", "priority"),
    [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3), (logging.CRITICAL, 2)],
)
def test_journal_priorities_are_sd_daemons(level: int, priority: int) -> None:
    assert journal_priority(level) == priority


def test_journal_text_has_a_priority_on_every_line_and_no_timestamp() -> None:
    rec = record("workers failed to start: %s\n  | %s", "it exited", "Traceback", level=logging.ERROR)
    assert TextFormatter(journal=True).format(rec).split("\n") == [
        "<3>ERROR workers failed to start: it exited",
        "<3>  | Traceback",
    ]


def test_journal_json_has_a_priority_and_no_time() -> None:
    line = JsonFormatter(journal=True).format(record("slot %d", 0, level=logging.WARNING))
    assert line.startswith("<4>{")
    entry = json.loads(line.removeprefix("<4>"))
    assert "time" not in entry and entry["message"] == "slot 0"


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[io.TextIOWrapper]:
    with (tmp_path / "stderr").open("w") as file:
        yield file


def test_the_journal_is_recognised_by_the_streams_device_and_inode(stream: io.TextIOWrapper) -> None:
    st = os.fstat(stream.fileno())
    assert logs_to_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    # Inherited by a process whose stderr was redirected elsewhere: not the journal.
    assert not logs_to_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not logs_to_journal(stream, {"JOURNAL_STREAM": "garbage"})
    assert not logs_to_journal(stream, {})
    assert not logs_to_journal(io.StringIO(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})  # no descriptor


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_configure_installs_one_handler_with_the_chosen_format(
    root_logger: logging.Logger, stream: io.TextIOWrapper
) -> None:
    logformat.configure("warning", "json", stream, {})
    assert len(root_logger.handlers) == 1 and root_logger.level == logging.WARNING
    (handler,) = root_logger.handlers
    assert isinstance(handler.formatter, JsonFormatter) and not handler.formatter.journal
    st = os.fstat(stream.fileno())
    logformat.configure("debug", "text", stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    (handler,) = root_logger.handlers
    assert isinstance(handler.formatter, TextFormatter) and handler.formatter.journal


def test_nan_and_infinities_stay_valid_json() -> None:
    fields = {"ratio": float("nan"), "limits": [float("inf"), 1.5, {"low": float("-inf")}]}
    line = JsonFormatter().format(record("x", extra={"event_fields": fields}))
    # The strict parser: Python's default accepts the NaN and Infinity that JSON has not.
    entry = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))
    assert (entry["ratio"], entry["limits"]) == ("nan", ["inf", 1.5, {"low": "-inf"}])


def test_critical_is_a_level_of_its_own() -> None:
    entry = json.loads(JsonFormatter().format(record("x", level=logging.CRITICAL)))
    assert entry["level"] == "critical"
