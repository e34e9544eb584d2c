"""``sockherd doctor``: what on this host would make nginx lose requests, and the fix.

Local checks read the sockherd config (as every command finds it), tmp_dir and what is
in it: whether the daemon would accept tmp_dir, whether nginx's worker user can
traverse to and connect to the sockets, and what a previous run left behind. The nginx
checks (:mod:`sockherd.doctor_nginx`) read nginx's configuration with a real parser
(:mod:`sockherd.nginx_conf`): ``--nginx PATH`` (a file, a saved ``nginx -T``, ``-`` for
stdin), else ``nginx -T``, with nginx's version (its defaults changed in 1.29.7) from
``nginx -v`` or ``--nginx-version``. Nothing is changed: every finding says what to write.

Exit codes: 0 nothing found would lose requests (warnings alone), 1 something would,
2 bad usage or unreadable input.
"""

from __future__ import annotations

import functools
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from sockherd.config import Config, ConfigError, find_config, load_config
from sockherd.daemon.environment import worker_environment
from sockherd.daemon.publish import (
    NGINX_USERS,
    SocketNames,
    TmpDirProblem,
    TmpDirProblemKind,
    published_target,
    socket_state,
    tmp_dir_problems,
)
from sockherd.doctor_nginx import App, Finding, check_nginx, parse_nginx_version
from sockherd.doctor_worker import worker_keepalive
from sockherd.nginx_conf import Directive, NginxConfError, is_dump, parse_dump, parse_file, parse_text

__all__ = ["Finding", "local_findings", "main", "read_nginx"]

EXIT_FAILED, EXIT_USAGE = 1, 2


class Unreadable(Exception):
    """The input the user named cannot be read (exit 2)."""


def main(config_path: Path | None, *, nginx: str | None, as_json: bool, nginx_version: str | None = None) -> int:
    """``nginx_version``: X.Y.Z, for a configuration given with ``nginx`` (else ``nginx -v``)."""
    try:
        if config_path is None:
            find_config(Path.cwd())  # no config at all is bad usage, as for every command
        conf: list[Directive] | None = None
        source = "not read"
        version = None
        if nginx_version is not None:
            version = parse_nginx_version(nginx_version) if re.fullmatch(r"[0-9.]+", nginx_version) else None
            if version is None:
                raise Unreadable(
                    f"--nginx-version {nginx_version!r}: expected nginx's version as X.Y.Z, such as 1.30.0"
                )
        if nginx is not None:
            conf, source = read_nginx(nginx)
    except (ConfigError, Unreadable) as exc:
        print(f"sockherd: doctor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    findings: list[Finding] = []
    if nginx is None:
        conf, source, problem = _nginx_dash_t()
        findings += [problem] if problem else []
        binary = _nginx_binary()
        if version is None and conf is not None and binary is not None:
            version = parse_nginx_version(_nginx_says(binary, "-V"))  # -V: the version, then the build (nginx_user)
    if conf is not None and version is not None:
        source += f", nginx {'.'.join(map(str, version))}"
    try:
        config: Config | None = load_config(config_path)
    except ConfigError as exc:
        config = None
        findings.append(_config_finding(str(exc)))
    if config is not None:
        findings = local_findings(config, conf) + findings
        if conf is not None:
            findings += check_nginx(conf, app_of(config), version)
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order[f.severity])
    if as_json:
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        for f in findings:
            where = f"{f.file}:{f.line}" if f.line is not None else f.file or "nginx"
            print(f"{where}: {f.severity}: {f.message}" + (f"; write: {f.fix}" if f.fix else ""))
        print(_summary(findings, config, source))
    return EXIT_FAILED if any(f.severity == "error" for f in findings) else 0


def _summary(findings: list[Finding], config: Config | None, source: str) -> str:
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    verdict = "requests would be lost: fix the errors above" if errors else "nothing found would lose requests"
    checked = f"config {config.path}, tmp_dir {config.tmp_dir}" if config else "config (did not load)"
    return f"{errors} error(s), {warnings} warning(s): {verdict} (checked {checked}; nginx: {source})"


def _config_finding(message: str) -> Finding:
    """A ConfigError names the file first (``sockherd.toml: key 'x': ...``); TOML errors a line."""
    file, _, reason = message.partition(": ")
    line = re.search(r"at line (\d+)", reason)
    return Finding(
        "error",
        "config",
        file if reason else None,
        int(line[1]) if line else None,
        f"the daemon refuses this config: {reason or message}",
        None,
    )


# --- nginx's configuration -----------------------------------------------------------------


def read_nginx(source: str) -> tuple[list[Directive], str]:
    """``--nginx``: a file, a saved ``nginx -T``, or ``-`` (stdin); raises Unreadable."""
    try:
        if source == "-":
            text = sys.stdin.read()
            if is_dump(text):
                return parse_dump(text)[0], "nginx -T from stdin"
            return parse_text(text, "<stdin>", prefix=os.getcwd()), "stdin"
        try:
            with open(source, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError as exc:
            raise Unreadable(f"{source}: cannot read: {exc.strerror or exc}") from None
        if is_dump(text):
            directives, files = parse_dump(text)
            return directives, f"nginx -T output {source} ({len(files)} file(s))"
        directives, files = parse_file(source)
        return directives, f"{source} ({len(files)} file(s))"
    except NginxConfError as exc:
        raise Unreadable(str(exc)) from None


def _nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


@functools.cache
def _nginx_says(binary: str, flag: str) -> str:
    """What ``nginx -v`` or ``-V`` prints (to stderr), or "" when it cannot be run; run
    once per doctor (its version and its compiled-in user both come from ``-V``)."""
    try:
        done = subprocess.run([binary, flag], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stderr + done.stdout


def _nginx_dash_t() -> tuple[list[Directive] | None, str, Finding | None]:
    """No ``--nginx``: ask nginx itself (``nginx -T``), and say so when it cannot."""
    binary = _nginx_binary()
    if binary is None:
        note = "nginx is not installed here: give its configuration with --nginx PATH to check it"
        return None, "not found", Finding("info", "nginx_read", None, None, note, None)
    try:
        done = subprocess.run([binary, "-T"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        done = subprocess.CompletedProcess([binary, "-T"], 1, "", str(exc))
    if done.returncode != 0 or not is_dump(done.stdout):
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        note = f"`{binary} -T` cannot read nginx's configuration ({why}); run as root, or give --nginx PATH"
        return None, "not read", Finding("warning", "nginx_read", None, None, note, None)
    try:
        directives, files = parse_dump(done.stdout)
    except NginxConfError as exc:
        return None, "not read", Finding("warning", "nginx_read", exc.file, exc.line, exc.reason, None)
    return directives, f"`{binary} -T` ({len(files)} file(s))", None


def nginx_user(conf: list[Directive] | None) -> tuple[str, str] | None:
    """nginx's worker user and where that comes from, or None when nginx is unknown here."""
    users = [d for d in conf or [] if d.name == "user" and d.args]
    if users:
        return users[-1].args[0], f"`user` at {users[-1].where}"
    binary = _nginx_binary()
    if conf is None or not any(d.name == "http" for d in conf):  # no nginx.conf read: the daemon's guess
        found = next((u for u in NGINX_USERS if _uid(u) is not None), None)
        why = "nginx's configuration was not read" if conf is None else "nginx.conf, which sets `user`, was not read"
        return (found, f"assumed: {why}") if found and binary else None
    compiled = re.search(r"--user=(\S+)", _nginx_says(binary, "-V")) if binary is not None else None
    if compiled:
        return compiled[1], "nginx's built-in default (no `user` directive)"
    return "nobody", "nginx's built-in default (no `user` directive)"


# --- local checks --------------------------------------------------------------------------


def app_of(config: Config) -> App:
    prefix, _, suffix = config.socket_file.partition("{worker}")
    listen = tuple(a.removeprefix("unix://") for a in config.listen if a.startswith("unix://"))
    environment = worker_environment(config.worker, os.environ, {})  # as the daemon would give it
    keepalive = worker_keepalive(config.worker.command, config.worker.cwd, environment)
    return App(config.tmp_dir, prefix, suffix, config.workers, listen, keepalive)


def local_findings(config: Config, conf: list[Directive] | None) -> list[Finding]:
    findings: list[Finding] = []
    running = socket_state(config.ipc_path)
    daemon = {
        True: "a daemon answers on",
        False: "no daemon is running (not an error): nothing answers on",
        None: "whether a daemon runs is unknown: this user may not connect to",
    }[running]
    findings.append(Finding("info", "daemon", str(config.ipc_path), None, f"{daemon} {config.ipc_path}", None))
    tmp_dir = config.tmp_dir
    if not os.path.lexists(tmp_dir):
        findings.append(
            Finding(
                "info",
                "tmp_dir",
                str(tmp_dir),
                None,
                "tmp_dir does not exist yet: the daemon creates it (mode 2750 with socket_group's group, else 750), "
                "unless systemd does first (RuntimeDirectory=)",
                None,
            )
        )
        return findings
    findings += _tmp_dir_findings(tmp_dir, *_daemon_uid(config))
    if os.path.isdir(tmp_dir) and not os.path.islink(tmp_dir):
        findings += _reach_findings(config, conf)
        findings += _stale_findings(config, running)
    return findings


def _daemon_uid(config: Config) -> tuple[int, str]:
    """The uid the daemon runs as: its IPC socket's owner when there is one, else this user."""
    try:
        st = os.lstat(config.ipc_path)
        if stat.S_ISSOCK(st.st_mode):
            return st.st_uid, f"the daemon's: the owner of {config.ipc_path}"
    except OSError:
        pass
    return os.getuid(), "this user's: run doctor as the daemon's user"


_UID_DEPENDENT: tuple[TmpDirProblemKind, ...] = ("owner", "parent_owner", "not_writable")


def _tmp_dir_findings(tmp_dir: Path, uid: int, whose: str) -> list[Finding]:
    """What makes the daemon refuse tmp_dir: publish.tmp_dir_problems, as the daemon checks it."""
    findings = []
    for problem in tmp_dir_problems(tmp_dir, uid):
        as_uid = f" (checked as uid {uid}, {whose})" if problem.kind in _UID_DEPENDENT else ""
        message = f"the daemon refuses it: {problem.message}{as_uid}"
        findings.append(Finding("error", "tmp_dir", str(problem.path), None, message, _tmp_dir_fix(problem, uid)))
    return findings


def _tmp_dir_fix(problem: TmpDirProblem, uid: int) -> str:
    path = shlex.quote(str(problem.path))
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    fixes: dict[TmpDirProblemKind, str] = {
        "symlink": f"tmp_dir = {json.dumps(os.path.realpath(problem.path))}",
        "not_a_directory": f"rm {path} (the daemon creates the directory)",
        "owner": f"chown {shlex.quote(user)} {path}",
        "writable_by_others": f"chmod 2750 {path}",
        "writable_by_group": f"chmod 2750 {path}",
        "parent_owner": "put tmp_dir under /run/<app>",
        "parent_writable": f"chmod go-w {path}, or put tmp_dir under /run/<app>",
        "not_writable": f"chown {shlex.quote(user)} {path}",
    }
    return fixes[problem.kind]


def _uid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _allows(st: os.stat_result, uid: int, groups: set[int], bit: int) -> bool:
    """POSIX permission for ``bit`` (4 r, 2 w, 1 x): owner bits, else group, else other."""
    if uid == 0:
        return True
    shift = 6 if st.st_uid == uid else 3 if st.st_gid in groups else 0
    return bool(st.st_mode >> shift & bit)


def _reach_findings(config: Config, conf: list[Directive] | None) -> list[Finding]:
    who = nginx_user(conf)
    if who is None:
        return []
    user, origin = who
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return [Finding("warning", "nginx_access", None, None, f"nginx's user {user} ({origin}) does not exist", None)]
    groups = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    group = grp.getgrgid(entry.pw_gid).gr_name
    tmp_dir = config.tmp_dir
    for directory in [*reversed(tmp_dir.parents), tmp_dir]:
        dst = os.stat(directory)
        if not _allows(dst, entry.pw_uid, groups, 1):
            quoted = shlex.quote(str(directory))
            if directory == tmp_dir:
                fix = f"chgrp {shlex.quote(group)} {quoted} && chmod 2750 {quoted}"
            else:
                fix = f"chmod o+x {quoted}"
            why = f"cannot traverse {directory} (mode {stat.S_IMODE(dst.st_mode):o}, group {_group(dst.st_gid)})"
            return [_unreachable(directory, user, origin, why, fix)]
    sockets = [t for i in range(config.workers) if (t := published_target(config.symlink_path(i))) and t.exists()]
    sockets += [Path(a.removeprefix("unix://")) for a in config.listen if a.startswith("unix://")]
    for sock in sockets:
        try:
            sst = os.stat(sock)
        except OSError:
            continue
        if not _allows(sst, entry.pw_uid, groups, 2):
            why = f"cannot connect to {sock} (mode {stat.S_IMODE(sst.st_mode):o}, group {_group(sst.st_gid)})"
            fix = f'socket_group = "{group}" in {config.path}' + (
                "" if config.worker.socket_mode & 0o020 else ' and socket_mode = "660"'
            )
            return [_unreachable(sock, user, origin, why, fix)]
    return []


def _unreachable(path: Path, user: str, origin: str, why: str, fix: str) -> Finding:
    message = f"nginx's user {user} ({origin}) {why}: every request gets 502 (13: Permission denied)"
    return Finding("error", "nginx_access", str(path), None, message, fix)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _stale_findings(config: Config, running: bool | None) -> list[Finding]:
    """What a previous run left in tmp_dir (the daemon's start-up sweep removes it)."""
    names = SocketNames.from_pattern(config.socket_file)
    later = {
        True: "the running daemon replaces it",
        False: "the daemon's start-up sweep removes it",
        None: "the daemon replaces it, or its start-up sweep removes it",
    }[running]
    findings = []
    unknown: list[str] = []
    for entry in sorted(os.scandir(config.tmp_dir), key=lambda e: e.name):
        path = Path(entry.path)
        live: bool | None = False
        if entry.is_symlink() and names.is_temp_name(entry.name):
            why = "a temporary symlink left by an interrupted swap"
        elif entry.is_symlink() and names.is_symlink_name(entry.name):
            target = published_target(path)
            live = socket_state(target) if target is not None and target.exists() else False
            why = f"a published symlink to {'a dead socket' if target and target.exists() else 'nothing'}"
            why += ": nginx's connects to it fail"
        elif stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode) and (
            names.is_worker_socket_name(entry.name) or entry.name == config.ipc_file
        ):
            live, why = socket_state(path), "a socket nothing accepts on"
        else:
            continue
        if live is None:
            unknown.append(entry.name)
        if live is not False:
            continue
        findings.append(
            Finding("warning", "stale", str(path), None, f"stale: {why}; {later}", f"rm {shlex.quote(str(path))}")
        )
    if unknown:
        findings.append(
            Finding(
                "info",
                "stale",
                str(config.tmp_dir),
                None,
                f"cannot tell whether {', '.join(unknown)} in tmp_dir are live: this user may not connect to them "
                "(permission denied); run doctor as root or as the daemon's user",
                None,
            )
        )
    return findings
