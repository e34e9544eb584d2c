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
- upstream keep-alive whose worker closes idle connections before nginx does
  (``keepalive_timeout``, 60 s by default): nginx writes a request into a connection
  the worker is closing;
- upstream keep-alive with HTTP/1.0 or ``Connection: close`` where the request is
  proxied (keep-alive is then silently off), including ``$connection_upgrade`` from
  the usual WebSocket ``map``, which sends ``close`` for every other request;
- server lines on a worker's own socket (it changes at every restart), and slots
  listed that do not exist or exist and are not listed.

nginx's defaults depend on its version: since 1.29.7 (stable 1.30) every ``upstream``
block keeps idle connections (``keepalive 32 local``; ``keepalive 0`` turns it off),
``proxy_http_version`` is 1.1 and ``Connection`` is no longer ``close``; before, none
of that without ``keepalive``, ``proxy_http_version 1.1`` and ``proxy_set_header
Connection ""``. Without a version the older defaults are assumed, and an upstream
without ``keepalive`` is also checked as 1.29.7 would use it (a warning, not an error).

A file without an ``http`` block (a ``conf.d`` fragment) is read as the inside of one.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from sockherd.doctor_worker import KeepAlive
from sockherd.nginx_conf import Directive, quote, walk

__all__ = ["KEEPALIVE_BY_DEFAULT", "App", "Finding", "check_nginx", "nginx_time", "parse_nginx_version"]

Severity = Literal["error", "warning", "info"]
Version = tuple[int, int, int]
NGINX_KEEPALIVE_TIMEOUT: Final = 60.0  # nginx's default upstream keepalive_timeout
KEEPALIVE_BY_DEFAULT: Final = (1, 29, 7)  # keepalive 32 local, proxy_http_version 1.1, no Connection: close
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
    keepalive: KeepAlive | None  # the worker's idle keep-alive; None: it closes after every response

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


def parse_nginx_version(text: str) -> Version | None:
    """``1.30.0``, or ``nginx -v``'s ``nginx version: nginx/1.22.1`` (OpenResty's
    ``openresty/1.25.3.1`` is nginx 1.25.3), as a tuple; None when there is none."""
    match = re.search(r"(?:^|nginx/|openresty/)([0-9]+)\.([0-9]+)\.([0-9]+)", text.strip())
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


@dataclass(frozen=True, slots=True)
class _Upstream:
    block: Directive
    servers: list[Directive]
    ours: list[tuple[Directive, str, int | None]]  # server, kind, slot
    keepalive: bool | None  # keeps idle connections; None: only if nginx is 1.29.7 or later

    @property
    def name(self) -> str:
        return self.block.args[0] if self.block.args else ""


def _unix_path(address: str) -> str | None:
    return address.removeprefix("unix:") if address.startswith("unix:") else None


def _server_text(server: Directive, params: dict[str, str]) -> str:
    args = [server.args[0], *(p for p in server.args[1:] if "=" not in p or p.split("=", 1)[0] not in params)]
    args += [f"{k}={v}" for k, v in params.items()]
    return f"server {' '.join(quote(a) for a in args)};"


def _slot_lines(app: App, slots: list[int] | range) -> str:
    return " ".join(f"server {quote('unix:' + app.slot_path(i))} max_fails=0;" for i in slots)


def _http_blocks(directives: list[Directive]) -> tuple[list[Directive], Finding | None]:
    """The http blocks; a file without one (a conf.d fragment) is read as the inside of one."""
    blocks = [d for d in directives if d.name == "http" and d.block is not None]
    if blocks or not directives:
        return blocks, None
    first = directives[0].file
    files = sorted({d.file for d, _ in walk(directives)} - {first})
    message = (
        f"{first} has no `http` block: read as a fragment that nginx.conf includes inside `http {{ }}` "
        "(its upstreams and servers checked as such; nginx's `user` and the http-level settings of nginx.conf "
        "were not read)"
    )
    if files:
        message += (
            f"; its includes were read relative to its own directory ({', '.join(files)}), while nginx resolves a "
            "relative include against its prefix (the directory of nginx.conf, e.g. /etc/nginx)"
        )
    return [Directive("http", (), first, 0, tuple(directives))], Finding("info", "fragment", first, None, message)


def check_nginx(directives: list[Directive], app: App, version: Version | None = None) -> list[Finding]:
    """``version``: nginx's, whose defaults apply; None when unknown (see the module's doc)."""
    modern = None if version is None else version >= KEEPALIVE_BY_DEFAULT
    blocks, fragment = _http_blocks(directives)
    findings: list[Finding] = [fragment] if fragment else []
    upstreams: dict[str, _Upstream] = {}
    for http in blocks:
        for d in http.block or ():
            if d.name != "upstream" or d.block is None:
                continue
            servers = d.children("server")
            ours = []
            for s in servers:
                path = _unix_path(s.args[0]) if s.args else None
                kind = app.socket_kind(path) if path else None
                if kind is not None:
                    ours.append((s, *kind))
            if ours:
                lines = d.children("keepalive")
                keepalive = (lines[-1].args[:1] != ("0",)) if lines else modern
                found = _Upstream(d, servers, ours, keepalive)
                upstreams[found.name.lower()] = found
                findings += _check_upstream(found, app)
    proxied = False
    for http in blocks:
        for d, inner in walk(http.block or ()):
            if d.name != "proxy_pass" or not d.args:
                continue
            parents = (http, *inner)
            target = re.sub(r"^https?://", "", d.args[0])
            if (path := _unix_path(target)) is not None:
                proxied = proxied or app.socket_kind(path.split(":", 1)[0]) is not None
                continue
            upstream = upstreams.get(re.split(r"[/:]", target, maxsplit=1)[0].lower())
            if upstream is not None:
                proxied = True
                findings += _check_location(d, parents, upstream, modern)
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
    if upstreams and version is None:
        findings.append(
            Finding(
                "info",
                "nginx_version",
                None,
                None,
                "nginx's version is unknown (give it with --nginx-version X.Y.Z): checked with the defaults of nginx "
                "before 1.29.7 (HTTP/1.0 and `Connection: close` to upstreams, keep-alive only with `keepalive`); "
                "an upstream without `keepalive` is also checked as 1.29.7 and later use it (keepalive 32 by "
                "default), as a warning",
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
                    _slot_lines(app, range(app.workers)),
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
                    _slot_lines(app, missing),
                )
            )
    findings += _check_keepalive_timeout(upstream, app)
    return findings


def _check_keepalive_timeout(upstream: _Upstream, app: App) -> list[Finding]:
    if upstream.keepalive is False or app.keepalive is None:
        return []
    keepalive = upstream.block.children("keepalive")
    timeout_lines = upstream.block.children("keepalive_timeout")
    at = timeout_lines[-1] if timeout_lines else keepalive[-1] if keepalive else upstream.block
    nginx_timeout = nginx_time(timeout_lines[-1].args[0]) if timeout_lines and timeout_lines[-1].args else None
    nginx_timeout = NGINX_KEEPALIVE_TIMEOUT if nginx_timeout is None else nginx_timeout
    shown = f"{nginx_timeout:g}s" + ("" if timeout_lines else " (nginx's default)")
    name = upstream.name
    if keepalive:
        keeps = f"upstream {name} keeps idle connections for {shown}"
    elif upstream.keepalive is None:
        keeps = (
            f"if nginx is 1.29.7 or later, upstream {name} keeps idle connections (keepalive 32 by default) for {shown}"
        )
    else:
        keeps = f"upstream {name} keeps idle connections (nginx's default keepalive 32) for {shown}"
    worker = app.keepalive
    if worker.timeout is None:
        return [
            Finding(
                "info",
                "keepalive_timeout",
                at.file,
                at.line,
                f"{keeps}; how long the worker{f' ({worker.server})' if worker.server else ''} keeps them is unknown "
                f"({worker.unknown}): it must be longer, or nginx reuses connections the worker is closing",
                None,
            )
        ]
    if worker.timeout > nginx_timeout:
        return []
    raise_to = worker.raise_with.replace("{seconds}", str(math.floor(nginx_timeout) + 15)) if worker.raise_with else ""
    lower = f"keepalive_timeout {_below(worker.timeout)}; (in upstream {name})"
    if worker.timeout <= 2 and raise_to:  # a shorter pool than that saves little: keep connections longer instead
        fix = f"run the worker with {raise_to}, or {lower}"
    else:
        fix = lower + (f", or run the worker with {raise_to}" if raise_to else "")
    return [
        Finding(
            "error" if upstream.keepalive else "warning",
            "keepalive_timeout",
            at.file,
            at.line,
            f"{keeps}, but the worker ({worker.server}) closes them after {worker.timeout:g}s: nginx writes requests "
            "into connections the worker is closing (502 for requests it cannot retry)",
            fix,
        )
    ]


def _below(seconds: float) -> str:
    """An nginx time strictly below ``seconds``: a second less, or half of it under 2 s."""
    if seconds >= 2:
        return f"{math.ceil(seconds) - 1}s"
    return f"{max(1, int(seconds * 500))}ms"


def _effective(parents: tuple[Directive, ...], name: str) -> list[Directive]:
    """The directives ``name`` that apply where ``parents`` ends: nginx takes the innermost
    level that sets any (an array directive such as proxy_set_header is not merged)."""
    for level in reversed(parents):
        found = level.children(name)
        if found:
            return found
    return []


def _check_location(
    proxy_pass: Directive, parents: tuple[Directive, ...], upstream: _Upstream, modern: bool | None
) -> list[Finding]:
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
    if not upstream.keepalive:  # off, or on only if nginx is 1.29.7+, whose defaults keep it on
        return findings
    old = "" if modern else " (nginx's default before 1.29.7)"
    version = _effective(parents, "proxy_http_version")
    default = ("1.1",) if modern else ("1.0",)  # nginx's, by version
    http_version = version[-1].args[:1] if version else default
    if http_version == ("1.0",):
        at = version[-1] if version else proxy_pass
        findings.append(
            Finding(
                "warning",
                "keepalive_http_version",
                at.file,
                at.line,
                f"upstream {name} keeps connections, but nginx talks HTTP/1.0{'' if version else old} to it here: "
                "every request opens and closes a connection",
                "proxy_http_version 1.1;" + ("" if version else " (in this location)"),
            )
        )
    headers = _effective(parents, "proxy_set_header")
    connection = [h for h in headers if h.args and h.args[0].lower() == "connection"]
    fix = 'proxy_set_header Connection "";'
    if connection:
        value = connection[-1].args[1] if len(connection[-1].args) > 1 else ""
        closes = _connection_closes(value, parents[0])
        if closes is not None:
            how, closes_fix = closes
            findings.append(
                Finding(
                    "warning",
                    "keepalive_connection",
                    connection[-1].file,
                    connection[-1].line,
                    f"upstream {name} keeps connections, but this sends `Connection: close` to it{how}, so the "
                    "worker closes them",
                    closes_fix or fix,
                )
            )
    elif modern:  # nginx 1.29.7 and later send no Connection header by default: nothing to say
        return findings
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
                f"upstream {name} keeps connections, but the proxy_set_header lines that apply to proxy_pass at "
                f"{proxy_pass.where} do not clear Connection, so nginx sends `Connection: close`{old}{inherited}",
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
                f"upstream {name} keeps connections, but nginx sends `Connection: close`{old} to it here",
                fix + " (in this location)",
            )
        )
    return findings


def _connection_closes(value: str, http: Directive) -> tuple[str, str] | None:
    """When ``proxy_set_header Connection VALUE`` asks for ``close``: (for which requests,
    the fix, "" for the usual one), else None. A variable set by a ``map`` on a request
    header (``$connection_upgrade`` from ``$http_upgrade``) is what its ``''`` entry, else
    its ``default``, gives for a request without that header, as nginx's map matches."""
    variable = re.fullmatch(r"\$(?:\{(\w+)\}|(\w+))", value)
    if variable is None:
        return ("", "") if "close" in value.lower() else None
    name = "$" + (variable[1] or variable[2])
    maps = [m for m in http.children("map") if m.block is not None and m.args[1:2] == (name,)]
    if not maps or not maps[-1].args[0].startswith("$http_"):
        return None  # not a map on a request header: what it gives is not known here
    the_map = maps[-1]
    entries = [e for e in the_map.block or () if e.name not in ("hostnames", "volatile") and e.args]
    exact = [e for e in entries if e.name == ""]
    regexes = [e for e in entries if e.name.startswith("~") and _matches_empty(e.name)]
    default = [e for e in entries if e.name == "default"]
    # nginx's order: an exact key, then the first regex that matches, then default
    chosen = exact or regexes or default
    if not chosen or "close" not in chosen[0].args[0].lower():
        return None  # no entry: the value is empty
    result, where = chosen[0].args[0], chosen[0].where
    header = the_map.args[0].removeprefix("$http_").replace("_", "-").title()
    return (
        f" for every request without the {header} header (the map at {where} gives `{result}`)",
        f"'' \"\"; in the map at {the_map.where}: requests without the {header} header then keep the connection, "
        "the others still get what the map gives them",
    )


def _matches_empty(key: str) -> bool:
    """Whether a map's regex key (``~re`` or ``~*re``) matches an empty value."""
    pattern = key[2:] if key.startswith("~*") else key[1:]
    try:
        return re.search(pattern, "") is not None
    except re.error:
        return False
