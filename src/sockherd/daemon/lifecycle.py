"""The daemon process's own life: the signals it handles, what it tells its service
manager, and the error that keeps it from starting."""

from __future__ import annotations

import contextlib
import os
import signal
import socket

HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


class DaemonError(Exception):
    """The daemon cannot start; the message says why."""


def reset_signal_dispositions() -> None:
    """Make sure workers start with default signal handling.

    exec() resets caught signals to default but keeps ignored ones ignored, and a
    daemon started from ``nohup`` or a shell's ``&`` has SIGINT/SIGQUIT/SIGHUP ignored;
    workers would inherit that and never stop on ^C or SIGINT. The mask is inherited
    too: it is cleared by :func:`unblock_signals`, once the daemon's handlers are in
    place (an upgrade blocks them across its exec, and what arrived meanwhile is
    delivered then).
    """
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)


def unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about the daemon itself, if it is listening."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)
