"""Read nginx's configuration as nginx does: a tokenizer and parser for its grammar.

Words, single- and double-quoted strings with nginx's escapes, ``#`` comments, ``;``
and ``{ }`` blocks; ``include`` expanded in place (globs relative to the conf prefix,
the main file's directory, as with ``nginx -c``); and the output of ``nginx -T``, which
concatenates every file it read under ``# configuration file PATH:`` headers. Every
directive keeps the file and the line it starts on, so a finding can point at it.

The tokenizer follows ``ngx_conf_read_token``: ``#``, quotes, ``{``, ``}`` and ``;``
are special only where a token starts; a word ends at whitespace, ``;`` or ``{`` (so
``${var}`` stays one word, as does ``a}``); a backslash keeps the next character in the
word; in every token ``\\"``, ``\\'`` and ``\\\\`` stand for the character and
``\\t``, ``\\r``, ``\\n`` for tab, CR and LF, while other backslashes stay as written.

OpenResty's ``*_by_lua_block { ... }`` holds Lua, not nginx syntax (``{1,2}``, ``#t``,
``'a; b'``): as lua-nginx-module does, the balanced block is skipped with a small Lua
lexer (strings with escapes, long brackets ``[[...]]``/``[=[...]=]``, ``--`` and
``--[[...]]`` comments) and becomes the directive's last argument, so
``content_by_lua_block { ... }`` reads as ``content_by_lua_block "<lua>";``.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Final

__all__ = ["Directive", "NginxConfError", "is_dump", "parse_dump", "parse_file", "parse_text", "quote", "walk"]

DUMP_HEADER: Final = re.compile(r"^# configuration file (?P<path>.+):$")
MAX_INCLUDE_DEPTH: Final = 32
_ESCAPES: Final = {'"': '"', "'": "'", "\\": "\\", "t": "\t", "r": "\r", "n": "\n"}
_GLOB_CHARS: Final = frozenset("*?[")
LUA_BLOCK_SUFFIX: Final = "_by_lua_block"
_LUA_LONG_OPEN: Final = re.compile(r"\[(=*)\[")


class NginxConfError(Exception):
    """The configuration cannot be read; the message starts with ``file:line:``."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}" if line is not None else f"{file}: {message}")
        self.file, self.line, self.reason = file, line, message


@dataclass(frozen=True, slots=True)
class Directive:
    """One directive: ``name args...;`` or ``name args... { block }``."""

    name: str
    args: tuple[str, ...]
    file: str
    line: int
    block: tuple[Directive, ...] | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def children(self, name: str) -> list[Directive]:
        return [d for d in self.block or () if d.name == name]

    def text(self) -> str:
        """The directive as it would be written (without its block)."""
        return " ".join([self.name, *(quote(arg) for arg in self.args)]) + ("" if self.block is None else " {")


def quote(arg: str) -> str:
    """``arg`` as nginx reads it back: bare when it can be, else double-quoted."""
    if arg and not re.search(r"[\s;{}\"'#\\]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "word", ";", "{", "}"
    value: str
    line: int


def tokenize(text: str, file: str) -> Iterator[_Token]:
    i, line, n = 0, 1, len(text)
    first: str | None = None  # the current directive's name, once read
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
        elif ch in " \t\r":
            i += 1
        elif ch == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif ch == "{" and first is not None and first.endswith(LUA_BLOCK_SUFFIX):
            end = _lua_block_end(text, i + 1, file, line)
            yield _Token("word", text[i + 1 : end - 1], line)
            line += text.count("\n", i, end)
            yield _Token(";", ";", line)
            i, first = end, None
        elif ch in ";{}":
            yield _Token(ch, ch, line)
            i, first = i + 1, None
        else:
            start_line = line
            value, i, line = _quoted(text, i, file, line) if ch in "\"'" else _word(text, i, line)
            first = value if first is None else first
            yield _Token("word", _unescape(value), start_line)


def _quoted(text: str, i: int, file: str, line: int) -> tuple[str, int, int]:
    """The string opened by the quote at ``i``: its raw text, the index past it, the line there."""
    n, quote_char, start_line = len(text), text[i], line
    j = i + 1
    while j < n and text[j] != quote_char:
        if text[j] == "\\" and j + 1 < n:
            j += 1
        if text[j] == "\n":
            line += 1
        j += 1
    if j >= n:
        raise NginxConfError(
            file, start_line, f"unexpected end of file: the string opened with {quote_char} here is not closed"
        )
    if j + 1 < n and text[j + 1] not in " \t\r\n;{)":
        raise NginxConfError(file, line, f'unexpected "{text[j + 1]}" after a quoted string')
    return text[i + 1 : j], j + 1, line


def _word(text: str, i: int, line: int) -> tuple[str, int, int]:
    """The bare word at ``i``: its raw text, the index past it, the line there."""
    n, j, variable = len(text), i, False
    while j < n:
        c = text[j]
        if c == "{" and variable:
            j += 1
            continue
        variable = c == "$"
        if c == "\\" and j + 1 < n:
            if text[j + 1] == "\n":
                line += 1
            j += 2
            continue
        if c in " \t\r\n;{":
            break
        j += 1
    return text[i:j], j, line


def _lua_block_end(text: str, i: int, file: str, line: int) -> int:
    """From just after a Lua block's ``{`` (on ``line``): the index just past its closing
    ``}``, skipping Lua strings, long brackets and comments as Lua reads them."""
    n, depth = len(text), 1
    while i < n:
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        elif ch == "-" and text.startswith("--", i):
            long = _LUA_LONG_OPEN.match(text, i + 2)
            if long:  # --[[ ... ]] or --[==[ ... ]==]
                i = _lua_long_end(text, long.end(), long[1], file, line)
            else:
                end = text.find("\n", i)
                i = n if end < 0 else end
            continue
        elif ch == "[" and (long := _LUA_LONG_OPEN.match(text, i)):
            i = _lua_long_end(text, long.end(), long[1], file, line)
            continue
        elif ch in "\"'":
            i += 1
            while i < n and text[i] != ch:
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                break
        i += 1
    raise NginxConfError(file, line, "unexpected end of file: the Lua block opened here is not closed")


def _lua_long_end(text: str, i: int, level: str, file: str, line: int) -> int:
    """The index just past the ``]=*]`` that closes a long bracket opened with ``level`` ``=``s."""
    end = text.find("]" + level + "]", i)
    if end < 0:
        raise NginxConfError(file, line, "unexpected end of file: the Lua block opened here is not closed")
    return end + len(level) + 2


def _unescape(raw: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), raw, flags=re.DOTALL)


Reader = Callable[[str, str, int], list[str]]  # (pattern, including file, line) -> matching files


class _Parser:
    """Turns tokens into directives, expanding ``include`` through ``read``/``expand``."""

    def __init__(self, read: Callable[[str], str], expand: Reader, prefix: str) -> None:
        self.read, self.expand, self.prefix = read, expand, prefix
        self.files: list[str] = []
        self._stack: list[str] = []

    def parse(self, file: str, text: str | None = None) -> list[Directive]:
        if file in self._stack:
            raise NginxConfError(file, None, "includes itself: " + " -> ".join([*self._stack, file]))
        if len(self._stack) >= MAX_INCLUDE_DEPTH:
            raise NginxConfError(file, None, f"includes nested more than {MAX_INCLUDE_DEPTH} deep")
        if text is None:
            text = self.read(file)
        if file not in self.files:
            self.files.append(file)
        self._stack.append(file)
        try:
            tokens = tokenize(text, file)
            directives = self._block(tokens, file, opened=None)
        finally:
            self._stack.pop()
        return directives

    def _block(self, tokens: Iterator[_Token], file: str, opened: int | None) -> list[Directive]:
        directives: list[Directive] = []
        words: list[_Token] = []
        for token in tokens:
            if token.kind == "word":
                words.append(token)
                continue
            if token.kind == "}":
                if words:
                    raise NginxConfError(file, token.line, f'unexpected "}}": "{words[0].value}" needs a ";" first')
                if opened is None:
                    raise NginxConfError(file, token.line, 'unexpected "}": no block is open')
                return directives
            if not words:
                raise NginxConfError(file, token.line, f'unexpected "{token.kind}"')
            head, args = words[0], tuple(w.value for w in words[1:])
            words = []
            if token.kind == "{":
                block = self._block(tokens, file, opened=head.line)
                directives.append(Directive(head.value, args, file, head.line, tuple(block)))
            elif head.value == "include":
                if len(args) != 1:
                    raise NginxConfError(file, head.line, f'"include" takes one file name, got {len(args)}')
                for included in self.expand(self._full(args[0]), file, head.line):
                    directives.extend(self.parse(included))
            else:
                directives.append(Directive(head.value, args, file, head.line))
        if words:
            raise NginxConfError(
                file, words[-1].line, f'unexpected end of file, expecting ";" after "{words[0].value}"'
            )
        if opened is not None:
            raise NginxConfError(file, opened, 'unexpected end of file, expecting "}" for the block opened here')
        return directives

    def _full(self, name: str) -> str:
        return name if os.path.isabs(name) else os.path.join(self.prefix, name)


def parse_text(text: str, file: str = "nginx.conf", prefix: str | None = None) -> list[Directive]:
    """One file's text; ``include`` reads from disk relative to ``prefix`` (its directory)."""
    parser = _disk_parser(prefix if prefix is not None else os.path.dirname(os.path.abspath(file)))
    return parser.parse(file, text)


def parse_file(path: str | Path) -> tuple[list[Directive], list[str]]:
    """A configuration file and what it includes; returns the directives and the files read."""
    file = os.path.abspath(path)
    parser = _disk_parser(os.path.dirname(file))
    return parser.parse(file), parser.files


def _disk_parser(prefix: str) -> _Parser:
    def read(file: str) -> str:
        try:
            with open(file, encoding="utf-8", errors="surrogateescape") as f:
                return f.read()
        except OSError as exc:
            raise NginxConfError(file, None, f"cannot read: {exc.strerror or exc}") from None

    def expand(pattern: str, including: str, line: int) -> list[str]:
        if not _GLOB_CHARS & set(pattern):
            if not os.path.exists(pattern):
                raise NginxConfError(including, line, f'include "{pattern}": no such file')
            return [pattern]
        return sorted(glob.glob(pattern))

    return _Parser(read, expand, prefix)


def is_dump(text: str) -> bool:
    """Whether ``text`` is ``nginx -T`` output (possibly with nginx's own ``nginx: ...`` lines first)."""
    for line in text.splitlines():
        if line.startswith("nginx: ") or not line.strip():
            continue
        return DUMP_HEADER.match(line) is not None
    return False


def split_dump(text: str) -> dict[str, str]:
    """``nginx -T`` output → each file's text, in the order nginx read them."""
    files: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines(keepends=True):
        match = DUMP_HEADER.match(line.rstrip("\r\n"))
        if match:
            current = files.setdefault(match["path"], [])
        elif current is not None:
            current.append(line)
    # nginx writes a line feed after each file's text: drop it, so the text is the file's.
    return {path: "".join(lines).removesuffix("\n") for path, lines in files.items()}


def parse_dump(text: str) -> tuple[list[Directive], list[str]]:
    """``nginx -T`` output: the first file is the main one, includes come from the dump."""
    files = split_dump(text)
    if not files:
        raise NginxConfError("nginx -T output", None, 'no "# configuration file PATH:" header in it')
    main = next(iter(files))

    def read(file: str) -> str:
        if file not in files:
            raise NginxConfError(file, None, "included, but not in the nginx -T output")
        return files[file]

    def expand(pattern: str, including: str, line: int) -> list[str]:
        if not _GLOB_CHARS & set(pattern):
            if pattern not in files:
                raise NginxConfError(including, line, f'include "{pattern}": not in the nginx -T output')
            return [pattern]
        return sorted(path for path in files if PurePath(path).match(pattern))

    parser = _Parser(read, expand, os.path.dirname(main))
    return parser.parse(main), parser.files


def walk(directives: tuple[Directive, ...] | list[Directive]) -> Iterator[tuple[Directive, tuple[Directive, ...]]]:
    """Every directive with its enclosing blocks (outermost first), depth first."""

    def visit(
        items: tuple[Directive, ...] | list[Directive], parents: tuple[Directive, ...]
    ) -> Iterator[tuple[Directive, tuple[Directive, ...]]]:
        for d in items:
            yield d, parents
            if d.block is not None:
                yield from visit(d.block, (*parents, d))

    return visit(directives, ())
