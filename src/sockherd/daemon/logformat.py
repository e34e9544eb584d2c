"""The daemon's log lines: text for people, JSON for log pipelines, and journald's priority.

Call sites tag the worker lifecycle lines with ``extra=worker_event("online", worker)``;
the text format ignores the tag (its lines stay what they were), the JSON format turns
it into fields. Under journald (``JOURNAL_STREAM`` names our stderr) every line starts
with its syslog priority, ``<6>``, as sd-daemon(3) describes, and carries no timestamp:
journald records both itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final, Literal, Protocol, TextIO

__all__ = [
    "FORMATS",
    "JsonFormatter",
    "TextFormatter",
    "configure",
    "journal_priority",
    "logs_to_journal",
    "worker_event",
]

LogFormat = Literal["text", "json"]
FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s sockherd[%(process)d] %(levelname)s %(message)s"
JOURNAL_TEXT_FORMAT: Final = "%(levelname)s %(message)s"  # journald adds the time, name and pid

# sd-daemon(3): SD_EMERG "<0>" … SD_DEBUG "<7>".
_PRIORITIES: Final = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_SD_DEBUG: Final = 7


class WorkerLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def index(self) -> int | None: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def generation(self) -> int: ...


def worker_event(event: str, worker: WorkerLike, **more: object) -> dict[str, object]:
    """The ``extra=`` of a worker lifecycle line: its event name and the worker's identity.

    ``index`` is None for a standby; ``more`` adds fields (``slot``, ``successor``).
    """
    fields = {"id": worker.id, "index": worker.index, "pid": worker.pid, "generation": worker.generation}
    return {"event": event, "event_fields": {**fields, **more}}


def journal_priority(levelno: int) -> int:
    """The syslog priority journald files a line of this level under."""
    return next((priority for level, priority in _PRIORITIES if levelno >= level), _SD_DEBUG)


def logs_to_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journal stream systemd connected us to.

    systemd sets ``JOURNAL_STREAM=DEV:INODE`` for the service's stdout/stderr; a child
    whose stderr was redirected elsewhere inherits the variable, hence the comparison
    (systemd.exec(5)).
    """
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):  # unset or malformed; a stream without a descriptor
        return False


def _prefix_lines(text: str, priority: int) -> str:
    # journald reads a stream line by line: a traceback's lines need the prefix too.
    return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


class TextFormatter(logging.Formatter):
    """The classic line; under journald without the time and with the priority prefix."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__(JOURNAL_TEXT_FORMAT if journal else TEXT_FORMAT)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return _prefix_lines(text, journal_priority(record.levelno)) if self.journal else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``event``, ``message``, then the
    event's fields (a worker's ``id``, ``index``, ``pid``, ``generation``), then
    ``exception`` when there is a traceback. A NaN or infinite field value is written as
    a string, keeping the line valid JSON."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {}
        if not self.journal:
            entry["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry["level"] = record.levelname.lower()
        entry["event"] = getattr(record, "event", None) or _event_of_logger(record.name)
        entry["message"] = record.getMessage()
        fields = getattr(record, "event_fields", None)
        if isinstance(fields, dict):
            entry.update((key, value) for key, value in fields.items() if key not in entry)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            line = json.dumps(entry, ensure_ascii=False, default=str, allow_nan=False)
        except ValueError:  # NaN or an infinity, which JSON has no numbers for
            line = json.dumps(_finite(entry), ensure_ascii=False, default=str)
        return f"<{journal_priority(record.levelno)}>{line}" if self.journal else line


def _finite(value: object) -> object:
    """``value`` with NaN and the infinities as the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _event_of_logger(name: str) -> str:
    """Untagged lines: ``log`` for sockherd's own, the logger's name for others (``asyncio``)."""
    return "log" if name in ("sockherd", "root") else name.removeprefix("sockherd.")


def configure(level: str, log_format: LogFormat, stream: TextIO, environ: Mapping[str, str]) -> None:
    """Set up the root logger for the daemon (replaces ``logging.basicConfig``)."""
    journal = logs_to_journal(stream, environ)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(journal=journal) if log_format == "json" else TextFormatter(journal=journal))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
