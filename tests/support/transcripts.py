"""Command transcripts in the docs (```console blocks): parse them, run them, compare.

A block is a list of commands, each with the output the doc says it prints::

    <!-- transcript: restart-fails -->
    ```console
    $ sockherd restart          # a trailing comment is not part of the command
    starting generation 2: 2 worker(s)
    …
    ```

The block's first line sets its prompt: ``$ `` or, for a root shell, ``# ``; every line
that starts with that prompt is a command, every other line is output of the command
above it. An indented block (inside a list item) loses its common indent. The HTML
comment on the line before the fence names the block for the test that reproduces it;
flags may follow the name: ``unordered`` (compare with :func:`match_unordered`),
``racy`` (the output depends on a race between processes that the doc explains, such
as which of two failing workers is reported first: the test may run it more than once).

:func:`match` is the comparison; its docstring lists every rule.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

FENCE = "```console"
ELLIPSIS = "…"
MARKER = re.compile(r"<!--\s*transcript:\s*(?P<name>[\w-]+)(?P<flags>(?:\s+[\w-]+)*)\s*-->")
PROMPTS = ("$ ", "# ")


@dataclass(frozen=True)
class Command:
    text: str  # as typed, without the prompt and a trailing comment
    line: int  # 1-based line of the command in the markdown file
    expected: tuple[str, ...]  # the output lines the doc shows, at line + 1, line + 2, …

    @property
    def background(self) -> bool:
        return re.search(r"(?<!&)&$", self.text) is not None


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # the line of the ```console fence
    marker: str | None  # the name in <!-- transcript: NAME FLAG… -->
    flags: frozenset[str]  # the words after it
    commands: tuple[Command, ...]

    @property
    def unordered(self) -> bool:
        """Compare with :func:`match_unordered` (a daemon's log)."""
        return "unordered" in self.flags

    @property
    def racy(self) -> bool:
        """The output depends on a race the doc explains: the test may need more than one run to see it."""
        return "racy" in self.flags

    @property
    def has_output(self) -> bool:
        return any(command.expected for command in self.commands)

    @property
    def where(self) -> str:
        name = f"{self.path.parent.name}/{self.path.name}:{self.line}"
        return f"{name} [{self.marker}]" if self.marker else name


def strip_comment(command: str) -> str:
    """``cmd args  # note`` → ``cmd args``; a ``#`` inside quotes or a word is kept (as bash does)."""
    quote = ""
    escaped = False
    for i, char in enumerate(command):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command.rstrip()


def _dedent(lines: list[str]) -> list[str]:
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    common = min(indents, default=0)
    return [line[common:] for line in lines]


def parse_blocks(path: Path) -> list[Block]:
    """Every ```console block of a markdown file, in order."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    n = 0
    while n < len(lines):
        if lines[n].strip() != FENCE:
            n += 1
            continue
        fence = n
        end = next((k for k in range(fence + 1, len(lines)) if lines[k].strip().startswith("```")), None)
        if end is None:
            raise ValueError(f"{path}:{fence + 1}: console block without a closing fence")
        marker = MARKER.search(lines[fence - 1]) if fence else None
        blocks.append(
            Block(
                path=path,
                line=fence + 1,
                marker=marker["name"] if marker else None,
                flags=frozenset(marker["flags"].split()) if marker else frozenset(),
                commands=_commands(path, fence + 2, _dedent(lines[fence + 1 : end])),
            )
        )
        n = end + 1
    return blocks


def _commands(path: Path, first_line: int, body: list[str]) -> tuple[Command, ...]:
    prompt = next((p for p in PROMPTS if body and body[0].startswith(p)), None)
    if prompt is None:
        raise ValueError(f"{path}:{first_line}: a console block must start with a `$ ` or `# ` command line")
    commands: list[Command] = []
    text, line, expected = "", 0, list[str]()
    for k, raw in enumerate(body):
        if raw.startswith(prompt):
            if k:
                commands.append(Command(text, line, tuple(expected)))
            text, line, expected = strip_comment(raw[len(prompt) :]), first_line + k, []
        else:
            expected.append(raw)
    commands.append(Command(text, line, tuple(expected)))
    return tuple(commands)


# --- comparing ------------------------------------------------------------------------

_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
TIMESTAMP = re.compile(
    "|".join(
        (
            r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?",  # logging's asctime, ISO 8601
            rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d {_MONTH} \d{{4}} \d\d:\d\d:\d\d GMT",  # HTTP Date
            rf"\b{_MONTH} +\d{{1,2}} +(?:\d\d:\d\d|\d{{4}})\b",  # ls -l
        )
    )
)
WORKER_ID = re.compile(r"\b(?:\d+|s)-[0-9a-f]{6}\b")
DIGITS = re.compile(r"\d+")
SPACE = re.compile(r"\s+")


def replace_all(text: str, replacements: Mapping[str, str]) -> str:
    """Each key of ``replacements`` replaced by its value, longest keys first, in one pass."""
    if not replacements:
        return text
    pattern = "|".join(re.escape(old) for old in sorted(replacements, key=len, reverse=True))
    return re.sub(pattern, lambda m: replacements[m[0]], text)


def normalise(line: str, paths: Mapping[str, str] | None = None) -> str:
    """One line as :func:`match` compares it (``paths``: real → doc, for real output)."""
    line = replace_all(line, paths or {})
    line = TIMESTAMP.sub("<time>", line)
    line = WORKER_ID.sub("<id>", line)
    line = DIGITS.sub("0", line)
    return SPACE.sub(" ", line).strip()


def is_ellipsis(line: str) -> bool:
    return line.strip() == ELLIPSIS


@dataclass(frozen=True)
class Mismatch:
    """Where the comparison failed: expected line ``index`` (None: extra output) vs actual line ``actual_index``."""

    index: int | None
    expected: str | None
    actual_index: int | None
    actual: str | None

    def describe(self, first_line: int, paths: Mapping[str, str]) -> str:
        """``first_line``: the file line of expected line 0."""
        actual = replace_all(self.actual or "", paths)
        if self.index is None:
            return f"output line {self.actual_index_1} is more than the doc shows: {actual!r}"
        where = f"doc line {first_line + self.index}: {self.expected!r}"
        if self.actual is None:
            return f"{where}\n    the output has no line for it"
        return f"{where}\n    output line {self.actual_index_1}: {actual!r}"

    @property
    def actual_index_1(self) -> int:
        return (self.actual_index or 0) + 1


def match(expected: Sequence[str], actual: Sequence[str], paths: Mapping[str, str] | None = None) -> Mismatch | None:
    """Compare real output with the lines a doc shows; None if they match.

    Both sides are normalised, line by line, before they are compared:

    1. paths: in the real output, each real path of ``paths`` (real → doc) becomes the
       path the doc shows (a test's temporary copy → ``/tmp/doc/hello``);
    2. timestamps become ``<time>``: logging's ``2026-11-21 06:50:52,098``, an HTTP
       ``Date`` (``Sat, 21 Nov 2026 07:04:14 GMT``), ``ls -l``'s ``Nov 21 06:24``;
    3. worker ids become ``<id>``: a slot index or ``s``, a dash, 6 hex digits
       (``0-e510f2``, ``s-2785fd``);
    4. every run of digits becomes ``0``: pids, generations, counts, uptimes, ports;
    5. runs of whitespace become one space, and the ends are stripped.

    Then the lines must match one for one, in order, except that a doc line that is
    only ``…`` stands for any number of real lines, none included.
    """
    want = [None if is_ellipsis(line) else normalise(line) for line in expected]
    got = [normalise(line, paths) for line in actual]
    failures: list[tuple[int, int]] = []

    @functools.cache
    def fits(i: int, j: int) -> bool:
        if i == len(want):
            if j < len(got):
                failures.append((i, j))
            return j == len(got)
        if want[i] is None:
            return fits(i + 1, j) or (j < len(got) and fits(i, j + 1))
        if j < len(got) and want[i] == got[j]:
            return fits(i + 1, j + 1)
        failures.append((i, j))
        return False

    if fits(0, 0):
        return None
    # Report the failure that got furthest into the doc's lines.
    i, j = max(failures, key=lambda f: (f[0], -f[1]))
    if i == len(want):
        return Mismatch(None, None, j, actual[j])
    return Mismatch(i, expected[i], j if j < len(actual) else None, actual[j] if j < len(actual) else None)


def match_unordered(
    expected: Sequence[str], actual: Sequence[str], paths: Mapping[str, str] | None = None
) -> Mismatch | None:
    """Every doc line (``…`` aside) is some line of the output, in any order; None if so.

    For output whose order is not fixed, such as a daemon's log, where the workers'
    lines interleave with the daemon's: each doc line takes a different output line;
    lines are normalised as in :func:`match`, and output lines the doc leaves out are
    allowed.
    """
    unused = [normalise(line, paths) for line in actual]
    for i, line in enumerate(expected):
        if is_ellipsis(line):
            continue
        try:
            unused.remove(normalise(line))
        except ValueError:
            return Mismatch(i, line, None, None)
    return None


def check_block(block: Block, outputs: Sequence[Sequence[str]], paths: Mapping[str, str]) -> str | None:
    """Compare each command's real output with the block's; a readable report, or None."""
    compare = match_unordered if block.unordered else match
    for command, output in zip(block.commands, outputs, strict=True):
        mismatch = compare(command.expected, output, paths)
        if mismatch is not None:
            real = [replace_all(line, paths) for line in output]
            return "\n".join(
                [
                    f"{block.where}: the output of `{command.text}` (line {command.line}) differs from the doc",
                    "  " + mismatch.describe(command.line + 1, paths),
                    "  the whole output (paths as in the doc):",
                    *(f"    | {line}" for line in real),
                ]
            )
    return None


# --- running --------------------------------------------------------------------------


def to_real(command: str, paths: Mapping[str, str]) -> str:
    """A doc command with the doc's paths replaced by the real ones (``paths``: real → doc)."""
    return replace_all(command, {doc: real for real, doc in paths.items()})


@dataclass
class Shell:
    """Runs a block's commands one by one, each with ``bash -c``, in ``cwd``, as the doc would.

    ``$?`` carries over from one command to the next (``echo $?``). A command ending in
    ``&`` runs in the background; its output is appended to the last foreground
    command's once it has ended. ``before[k]`` runs before command ``k`` (to wait for
    an event, or to do what the doc does off screen); ``after`` runs after the last
    command, before the background commands are waited for.
    """

    cwd: Path
    env: Mapping[str, str]
    paths: Mapping[str, str]  # real → doc
    timeout: float = 60.0

    def run(
        self,
        block: Block,
        before: Mapping[int, Callable[[], object]] | None = None,
        after: Callable[[], object] | None = None,
    ) -> list[list[str]]:
        outputs: list[list[str]] = []
        background: list[subprocess.Popen[str]] = []
        status = 0
        try:
            for k, command in enumerate(block.commands):
                if before and k in before:
                    before[k]()
                script = f"(exit {status}); {to_real(command.text, self.paths)}"
                if command.background:
                    background.append(self._popen(script.removesuffix("&").rstrip()))
                    outputs.append([])
                    continue
                proc = self._popen(script)
                try:
                    out, _ = proc.communicate(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    raise AssertionError(
                        f"{block.where}: `{command.text}` still running after {self.timeout}s"
                    ) from None
                status = proc.returncode
                outputs.append(out.splitlines())
            if after:
                after()
            last = max(k for k, command in enumerate(block.commands) if not command.background)
            for proc in background:
                try:
                    out, _ = proc.communicate(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"{block.where}: a background command still runs after the block") from None
                outputs[last].extend(out.splitlines())
        finally:
            for proc in background:
                _kill_group(proc)
        return outputs

    def _popen(self, script: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["bash", "-c", script],
            cwd=self.cwd,
            env=dict(self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: a background job is killed whole
        )


def _kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.stdout is not None and not proc.stdout.closed:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)  # a daemon's workers, in sessions of their own, may hold the pipe
        proc.stdout.close()
    proc.wait()


# --- usage examples ---------------------------------------------------------------------

CONTROL = {"&&", "||", ";", "|", "&", "(", ")", ";;", "|&"}


def sockherd_invocations(command: str) -> list[list[str]]:
    """The arguments of every ``sockherd …`` simple command in a shell command line.

    Control operators split the line; a redirection ends a command's arguments (a digit
    just before it is its file descriptor).
    """
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found: list[list[str]] = []
    words: list[str] = []
    for token in [*lexer, ";"]:
        if token in CONTROL:
            if words and words[0] == "sockherd":
                found.append(words[1:])
            words = []
        else:
            words.append(token)
    return [_before_redirection(argv) for argv in found]


def _before_redirection(argv: list[str]) -> list[str]:
    for k, word in enumerate(argv):
        if word[0] in "<>" or word.startswith("&>"):
            return argv[: k - 1] if k and argv[k - 1].isdigit() else argv[:k]
    return argv
