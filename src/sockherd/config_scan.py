"""The string values of a few top-level keys of a TOML file, read without a TOML parser.

The CLI's fast path (:mod:`sockherd.cli_fast`) needs three keys of the config file to
find the daemon: ``tmp_dir``, ``ipc_file`` and ``extends``. Importing :mod:`tomllib`
(and the :mod:`typing`, :mod:`datetime` and :mod:`string` it imports) was the largest
part of that path's start-up: a third of what ``sockherd status`` imports beyond Python
itself, and a deploy script pays it on every ``sockherd restart``.

This reads a subset of TOML and knows when it is outside it: :func:`scan` returns
``None`` whenever it cannot be certain, and the caller parses the file with
:mod:`tomllib` then. Certain means: up to the first table header (the part of the file
where top-level keys live), every string is a one-line string (a ``\"\"\"`` or ``'''``
anywhere there gives up), so that brackets and ``#`` outside strings say exactly where
each value and comment ends; each key line starts with a bare key (a quoted first key,
which might spell one of the names, gives up); the values of the names asked for are
plain one-line strings without escapes (anything else gives up); and no line of the
rest of the file that starts with ``[`` mentions one of them (``[ipc_file]`` would make
it a table). A property test
(``tests/unit/test_config_scan.py``) checks it against :mod:`tomllib` on generated
files: whenever this returns a value, it is tomllib's.

It does not validate the rest of the file: a file broken after the daemon started still
leads the fast path to that daemon (``reload`` and ``config`` read it with the checker).
"""

from __future__ import annotations

__all__ = ["scan"]

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SPACE = " \t"


class _Unsure(Exception):
    """Outside the subset: let tomllib read the file."""


def scan(text: str, names: frozenset[str]) -> dict[str, str] | None:
    """The values of the top-level keys in ``names`` that the file sets (a name it does not
    set is absent); None if the file goes beyond what this reads with certainty."""
    try:
        return _Scanner(text, names).top_level()
    except _Unsure:
        return None


class _Scanner:
    def __init__(self, text: str, names: frozenset[str]) -> None:
        if text.startswith("\ufeff"):
            raise _Unsure
        self.text = text.replace("\r\n", "\n")
        self.names = names
        self.at = 0
        self.found: dict[str, str] = {}

    def top_level(self) -> dict[str, str]:
        text = self.text
        while self.at < len(text):
            self._skip(_SPACE)
            if self.at >= len(text):
                break
            char = text[self.at]
            if char == "\n":
                self.at += 1
            elif char == "#":
                self._to_line_end()
            elif char == "[":
                self._check_headers()  # the first table header: no top-level key comes after it
                break
            else:
                self._key_value()
        return self.found

    def _check_headers(self) -> None:
        """A header such as ``[ipc_file]`` makes the name a table: tomllib then has no
        string for it, and the full CLI must say why rather than this path use a default."""
        for line in self.text[self.at :].split("\n"):
            if line.lstrip(_SPACE).startswith("[") and any(name in line for name in self.names):
                raise _Unsure

    def _key_value(self) -> None:
        start = self.at
        self._skip(_BARE)
        key = self.text[start : self.at]
        if not key:
            raise _Unsure  # a quoted key, or not TOML: either might spell a name
        self._skip(_SPACE)
        follows = self._peek()
        if follows == ".":
            if key in self.names:
                raise _Unsure  # `tmp_dir.x = ...`: not a string, and not worth certainty
            self._value()  # a dotted key of another table: its value matters only for its extent
            return
        if follows != "=":
            raise _Unsure
        self.at += 1
        self._skip(_SPACE)
        if key not in self.names:
            self._value()
            return
        if key in self.found:
            raise _Unsure  # defined twice: invalid, tomllib says so
        self.found[key] = self._plain_string()
        self._line_end()

    def _plain_string(self) -> str:
        quote = self._peek()
        if quote not in ('"', "'"):
            raise _Unsure
        end = self.text.find(quote, self.at + 1)
        if end < 0:
            raise _Unsure
        value = self.text[self.at + 1 : end]
        if value == "" and self.text.startswith(quote * 3, self.at):
            raise _Unsure  # a multi-line string
        if "\n" in value or (quote == '"' and "\\" in value):
            raise _Unsure
        self.at = end + 1
        return value

    def _line_end(self) -> None:
        """Only a comment may follow a value on its line."""
        self._skip(_SPACE)
        char = self._peek()
        if char == "#":
            self._to_line_end()
        elif char not in ("\n", ""):
            raise _Unsure

    def _value(self) -> None:
        """Step over any value: to the end of its line at bracket depth zero."""
        text, depth = self.text, 0
        while self.at < len(text):
            char = text[self.at]
            if char in "\"'":
                self._one_line_string(char)
                continue
            if char == "#":
                self._to_line_end()
                continue
            if char == "\n" and depth == 0:
                return
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth < 0:
                    raise _Unsure
            self.at += 1
        if depth:
            raise _Unsure

    def _one_line_string(self, quote: str) -> None:
        text = self.text
        if text.startswith(quote * 3, self.at):
            raise _Unsure  # a multi-line string: its lines could look like anything
        at = self.at + 1
        while at < len(text):
            char = text[at]
            if char == "\n":
                raise _Unsure
            if char == "\\" and quote == '"':
                at += 2
                continue
            if char == quote:
                self.at = at + 1
                return
            at += 1
        raise _Unsure

    def _to_line_end(self) -> None:
        end = self.text.find("\n", self.at)
        self.at = len(self.text) if end < 0 else end

    def _skip(self, chars: frozenset[str] | str) -> None:
        text, at = self.text, self.at
        while at < len(text) and text[at] in chars:
            at += 1
        self.at = at

    def _peek(self) -> str:
        return self.text[self.at] if self.at < len(self.text) else ""
