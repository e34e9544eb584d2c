"""``sockherd doctor``'s nginx checks: the settings measured to cost requests.

Given nginx's parsed configuration and this app's socket names, find the upstreams
that point at the app and the locations that proxy to them, and flag (with file:line
and the text to write instead):

- a multi-server upstream without ``max_fails=0``: nginx's default ``max_fails=1
  fail_timeout=10s`` takes a socket out for 10 s after one failed connect during a
  worker replacement (measured: 73-78 % failed requests with a worker killed every
  2.5 s). nginx ignores ``max_fails`` for a single server;
- ``proxy_next_upstream`` without ``error``: a failed connect is not retried on the
  next socket;
- upstream ``keepalive`` whose worker closes idle connections before nginx does
  (``keepalive_timeout``, 60 s by default): nginx writes a request into a connection
  the worker is closing;
- upstream ``keepalive`` without ``proxy_http_version 1.1`` and ``proxy_set_header
  Connection ""`` where the request is proxied (keep-alive is then silently off);
- server lines on a worker's own socket (it changes at every restart), and slots
  listed that do not exist or exist and are not listed.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from sockherd.nginx_conf import Directive, walk

__all__ = ["App", "Finding", "check_nginx", "nginx_time", "worker_keepalive"]

Severity = Literal["error", "warning", "info"]
NGINX_KEEPALIVE_TIMEOUT: Final = 60.0  # nginx's default upstream keepalive_timeout
# sockherd.uvicorn's DEFAULT_TIMEOUT_KEEP_ALIVE (a test checks): not imported, uvicorn is optional
RUNNER_KEEP_ALIVE: Final = 75
_TIME_UNITS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "M": 2592000, "y": 31536000}


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    check: str
    file: str | None
    line: int | None
    message: str
    fix: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in ("severity", "check", "file", "line", "message", "fix")}


@dataclass(frozen=True, slots=True)
class App:
    """What of this app nginx may name: its tmp_dir's socket names and its listeners."""

    tmp_dir: Path
    prefix: str  # socket_file before and after {worker}
    suffix: str
    workers: int
    listen: tuple[str, ...]  # unix socket paths of shared listeners
    keepalive: tuple[str, float] | None  # (what the worker is, its keep-alive timeout), if known
    keepalive_unknown: bool = False  # the command says nothing we can read

    def socket_kind(self, path: str) -> tuple[str, int | None] | None:
        """("slot", N), ("worker", None), ("listener", None) or None (not this app's)."""
        if os.path.normpath(path) in {os.path.normpath(p) for p in self.listen}:
            return ("listener", None)
        directory, name = os.path.split(os.path.normpath(path))
        if os.path.normpath(directory) != os.path.normpath(self.tmp_dir) and os.path.realpath(
            directory
        ) != os.path.realpath(self.tmp_dir):
            return None
        middle = (
            re.escape(self.prefix)
            + r"(?:(?P<slot>[0-9]+)|(?P<worker>(?:[0-9]+|s)-[0-9a-f]{6}))"
            + re.escape(self.suffix)
        )
        match = re.fullmatch(middle, name)
        if match is None:
            return None
        return ("slot", int(match["slot"])) if match["slot"] is not None else ("worker", None)

    def slot_path(self, index: int) -> str:
        return str(self.tmp_dir / f"{self.prefix}{index}{self.suffix}")


def nginx_time(text: str) -> float | None:
    """nginx's time syntax (``60``, ``75s``, ``1m30s``, ``500ms``) in seconds, or None."""
    parts = re.findall(r"([0-9]+)(ms|[smhdwMy]?)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(int(n) * _TIME_UNITS.get(u or "s", 1) for n, u in parts)


def worker_keepalive(command: Iterable[str]) -> tuple[str, float] | None:
    """The worker's idle keep-alive timeout read from its command, or None when it is
    not a server we know (or one that does not keep connections open)."""
    argv = [word for arg in command for word in (shlex.split(arg) if " " in arg else [arg])]

    def option(names: tuple[str, ...]) -> str | None:
        for i, word in enumerate(argv):
            for name in names:
                if word == name and i + 1 < len(argv):
                    return argv[i + 1]
                if word.startswith(name + "="):
                    return word.split("=", 1)[1]
        return None

    def number(value: str | None, default: float) -> float:
        try:
            return float(value) if value is not None else default
        except ValueError:
            return default

    programs = [os.path.basename(w) for w in argv] + [argv[i + 1] for i, w in enumerate(argv[:-1]) if w == "-m"]
    if "sockherd.uvicorn" in programs:
        return ("python -m sockherd.uvicorn", number(option(("--timeout-keep-alive",)), RUNNER_KEEP_ALIVE))
    if "uvicorn" in programs:
        return ("uvicorn", number(option(("--timeout-keep-alive",)), 5))
    if "hypercorn" in programs:
        return ("hypercorn", number(option(("--keep-alive",)), 5))
    if "gunicorn" in programs:
        worker_class = option(("-k", "--worker-class"))
        threads = number(option(("--threads",)), 1)
        if (worker_class is None or worker_class == "sync") and threads <= 1:
            return None  # the sync worker closes every connection after its response
        return ("gunicorn", number(option(("--keep-alive",)), 2))
    return None


@dataclass(frozen=True, slots=True)
class _Upstream:
    block: Directive
    servers: list[Directive]
    ours: list[tuple[Directive, str, int | None]]  # server, kind, slot

    @property
    def name(self) -> str:
        return self.block.args[0] if self.block.args else ""


def _unix_path(address: str) -> str | None:
    return address.removeprefix("unix:") if address.startswith("unix:") else None


def _server_text(server: Directive, params: dict[str, str]) -> str:
    args = [server.args[0], *(p for p in server.args[1:] if "=" not in p or p.split("=", 1)[0] not in params)]
    args += [f"{k}={v}" for k, v in params.items()]
    return f"server {' '.join(args)};"


def check_nginx(directives: list[Directive], app: App) -> list[Finding]:
    findings: list[Finding] = []
    upstreams: dict[str, _Upstream] = {}
    for d, parents in walk(directives):
        if d.name == "upstream" and [p.name for p in parents] == ["http"] and d.block is not None:
            servers = d.children("server")
            ours = []
            for s in servers:
                path = _unix_path(s.args[0]) if s.args else None
                kind = app.socket_kind(path) if path else None
                if kind is not None:
                    ours.append((s, *kind))
            if ours:
                found = _Upstream(d, servers, ours)
                upstreams[found.name.lower()] = found
                findings += _check_upstream(found, app)
    proxied = False
    for d, parents in walk(directives):
        if d.name != "proxy_pass" or not d.args or not parents or parents[0].name != "http":
            continue
        target = re.sub(r"^https?://", "", d.args[0])
        if (path := _unix_path(target)) is not None:
            proxied = proxied or app.socket_kind(path.split(":", 1)[0]) is not None
            continue
        upstream = upstreams.get(re.split(r"[/:]", target, maxsplit=1)[0].lower())
        if upstream is not None:
            proxied = True
            findings += _check_location(d, parents, upstream)
    if not upstreams and not proxied:
        where = app.listen[0] if app.listen else app.slot_path(0)
        findings.append(
            Finding(
                "warning",
                "no_upstream",
                None,
                None,
                f"nginx's configuration names none of this app's sockets (such as unix:{where}); "
                "is this the nginx in front of it?",
                None,
            )
        )
    seen: set[tuple[str, str | None, int | None]] = set()
    unique = []
    for f in findings:
        if (f.check, f.file, f.line) not in seen:
            seen.add((f.check, f.file, f.line))
            unique.append(f)
    return unique


def _check_upstream(upstream: _Upstream, app: App) -> list[Finding]:
    findings = []
    name = upstream.name
    for server, kind, _ in upstream.ours:
        if kind == "worker":
            findings.append(
                Finding(
                    "error",
                    "worker_socket",
                    server.file,
                    server.line,
                    f"upstream {name} lists a worker's own socket, which is gone after the next restart; "
                    "list the slots' symlinks instead",
                    " ".join(f"server unix:{app.slot_path(i)} max_fails=0;" for i in range(app.workers)),
                )
            )
    if len(upstream.servers) > 1:
        for server, _, _ in upstream.ours:
            params = dict(p.split("=", 1) for p in server.args[1:] if "=" in p)
            if params.get("max_fails") != "0":
                now = f"max_fails={params['max_fails']}" if "max_fails" in params else "nginx's default max_fails=1"
                findings.append(
                    Finding(
                        "error",
                        "max_fails",
                        server.file,
                        server.line,
                        f"upstream {name} has {len(upstream.servers)} servers and {now}: one failed connect while a "
                        "worker is replaced takes this socket out for fail_timeout (10 s by default); measured "
                        "73-78 % failed requests with a worker killed every 2.5 s",
                        _server_text(server, {"max_fails": "0"}),
                    )
                )
    if not app.listen:
        listed = {slot for _, kind, slot in upstream.ours if kind == "slot" and slot is not None}
        for server, kind, slot in upstream.ours:
            if kind == "slot" and slot is not None and slot >= app.workers:
                findings.append(
                    Finding(
                        "warning",
                        "slots",
                        server.file,
                        server.line,
                        f"slot {slot} does not exist with workers = {app.workers}: every request that tries it "
                        "pays a failed connect() and a [crit] line in nginx's error log",
                        "remove this line (or raise workers)",
                    )
                )
        missing = [i for i in range(app.workers) if i not in listed]
        if missing:
            findings.append(
                Finding(
                    "warning",
                    "slots",
                    upstream.block.file,
                    upstream.block.line,
                    f"upstream {name} does not list slot(s) {', '.join(map(str, missing))}: "
                    "those workers get no traffic",
                    " ".join(f"server unix:{app.slot_path(i)} max_fails=0;" for i in missing),
                )
            )
    findings += _check_keepalive_timeout(upstream, app)
    return findings


def _check_keepalive_timeout(upstream: _Upstream, app: App) -> list[Finding]:
    keepalive = upstream.block.children("keepalive")
    if not keepalive:
        return []
    timeout_lines = upstream.block.children("keepalive_timeout")
    at = timeout_lines[-1] if timeout_lines else keepalive[-1]
    nginx_timeout = (
        (nginx_time(timeout_lines[-1].args[0]) if timeout_lines[-1].args else None) if timeout_lines else None
    )
    nginx_timeout = NGINX_KEEPALIVE_TIMEOUT if nginx_timeout is None else nginx_timeout
    shown = f"{nginx_timeout:g}s" + ("" if timeout_lines else " (nginx's default)")
    if app.keepalive is None:
        if not app.keepalive_unknown:
            return []
        return [
            Finding(
                "info",
                "keepalive_timeout",
                at.file,
                at.line,
                f"upstream {upstream.name} keeps idle connections for {shown}; the worker's command does not say "
                "how long it keeps them: it must be longer, or nginx reuses connections the worker is closing",
                None,
            )
        ]
    server, worker_timeout = app.keepalive
    if worker_timeout > nginx_timeout:
        return []
    below = max(1, int(worker_timeout) - 1)
    option = "--keep-alive" if server in ("gunicorn", "hypercorn") else "--timeout-keep-alive"
    return [
        Finding(
            "error",
            "keepalive_timeout",
            at.file,
            at.line,
            f"upstream {upstream.name} keeps idle connections for {shown}, but the worker ({server}) closes them "
            f"after {worker_timeout:g}s: nginx writes requests into connections the worker is closing (502 for "
            "requests it cannot retry)",
            f"keepalive_timeout {below}s; (in upstream {upstream.name}), or run the worker with "
            f"{option} {int(nginx_timeout) + 15}",
        )
    ]


def _effective(parents: tuple[Directive, ...], name: str) -> list[Directive]:
    """The directives ``name`` that apply where ``parents`` ends: nginx takes the innermost
    level that sets any (an array directive such as proxy_set_header is not merged)."""
    for level in reversed(parents):
        found = level.children(name)
        if found:
            return found
    return []


def _check_location(proxy_pass: Directive, parents: tuple[Directive, ...], upstream: _Upstream) -> list[Finding]:
    findings = []
    name = upstream.name
    next_upstream = _effective(parents, "proxy_next_upstream")
    if next_upstream and "error" not in next_upstream[-1].args and len(upstream.servers) > 1:
        d = next_upstream[-1]
        kept = [a for a in d.args if a not in ("off", "error", "timeout")]
        findings.append(
            Finding(
                "error",
                "proxy_next_upstream",
                d.file,
                d.line,
                f"`{d.text()};` applies to proxy_pass http://{name} ({proxy_pass.where}) and lacks `error`: a request "
                "whose connect() fails (a slot between two workers) is answered 502 instead of going to the next "
                "socket",
                f"proxy_next_upstream {' '.join(['error', 'timeout', *kept])};",
            )
        )
    if not upstream.block.children("keepalive"):
        return findings
    version = _effective(parents, "proxy_http_version")
    if not version or version[-1].args != ("1.1",):
        at = version[-1] if version else proxy_pass
        findings.append(
            Finding(
                "warning",
                "keepalive_http_version",
                at.file,
                at.line,
                f"upstream {name} has keepalive, but nginx talks HTTP/1.0 to it here: every request opens and "
                "closes a connection",
                "proxy_http_version 1.1;" + ("" if version else " (in this location)"),
            )
        )
    headers = _effective(parents, "proxy_set_header")
    connection = [h for h in headers if h.args and h.args[0].lower() == "connection"]
    fix = 'proxy_set_header Connection "";'
    if connection:
        value = connection[-1].args[1] if len(connection[-1].args) > 1 else ""
        if value and "$" not in value:
            findings.append(
                Finding(
                    "warning",
                    "keepalive_connection",
                    connection[-1].file,
                    connection[-1].line,
                    f"upstream {name} has keepalive, but this sends `Connection: {value}` to it, so the worker closes "
                    "every connection",
                    fix,
                )
            )
    elif headers:
        outer = [
            h
            for level in parents
            for h in level.children("proxy_set_header")
            if h.args and h.args[0].lower() == "connection" and h not in headers
        ]
        inherited = (
            f'; the `Connection ""` at {outer[-1].where} is not inherited: a level that sets any '
            "proxy_set_header replaces every outer one"
            if outer
            else ""
        )
        findings.append(
            Finding(
                "warning",
                "keepalive_connection",
                headers[0].file,
                headers[0].line,
                f"upstream {name} has keepalive, but the proxy_set_header lines that apply to proxy_pass at "
                f"{proxy_pass.where} do not clear Connection, so nginx sends `Connection: close`{inherited}",
                fix + " (next to this line)",
            )
        )
    else:
        findings.append(
            Finding(
                "warning",
                "keepalive_connection",
                proxy_pass.file,
                proxy_pass.line,
                f"upstream {name} has keepalive, but nginx sends `Connection: close` to it here",
                fix + " (in this location)",
            )
        )
    return findings
