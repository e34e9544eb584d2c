"""The doc-transcript parser and matcher (tests/support/transcripts.py): a matching and a mismatching case per rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.transcripts import (
    Mismatch,
    check_block,
    match,
    match_unordered,
    parse_blocks,
    sockherd_invocations,
    strip_comment,
    to_real,
)

PATHS = {"/tmp/sh-x1y2z3/hello": "/tmp/doc/hello", "/tmp/sh-x1y2z3/t": "/tmp/sockherd-hello"}


def test_paths_are_mapped_to_the_docs() -> None:
    assert match(["cwd /tmp/doc/hello"], ["cwd /tmp/sh-x1y2z3/hello"], PATHS) is None
    assert match(["cwd /tmp/doc/hello"], ["cwd /tmp/elsewhere/hello"], PATHS) is not None


def test_the_longest_real_path_wins() -> None:
    paths = {"/tmp/r": "/tmp/doc", "/tmp/r/t": "/tmp/sockherd-hello"}
    assert match(["/tmp/sockherd-hello/app.0.sock"], ["/tmp/r/t/app.0.sock"], paths) is None
    assert match(["/tmp/doc/t/app.0.sock"], ["/tmp/r/t/app.0.sock"], paths) is not None


def test_commands_get_the_real_paths() -> None:
    assert to_real("ls -l /tmp/sockherd-hello", PATHS) == "ls -l /tmp/sh-x1y2z3/t"


@pytest.mark.parametrize(
    ("doc", "real"),
    [
        ("2026-11-21 06:50:52,098 sockherd INFO x", "2024-01-02 13:04:05,001 sockherd INFO x"),
        ("date: Sat, 21 Nov 2026 07:04:14 GMT", "date: Mon, 01 Dec 2025 17:47:29 GMT"),
        ("srw------- 1 root root 0 Nov 21 06:22 sockherd.ipc", "srw------- 1 root root 0 Dec  1 16:47 sockherd.ipc"),
    ],
)
def test_timestamps_differ_freely(doc: str, real: str) -> None:
    assert match([doc], [real]) is None


def test_a_timestamp_is_not_any_word() -> None:
    assert match(["2026-11-21 06:50:52,098 INFO x"], ["yesterday INFO x"]) is not None
    assert match(["date: Sat, 21 Nov 2026 07:04:14 GMT"], ["date: soon"]) is not None


def test_worker_ids_differ_freely() -> None:
    assert match(["worker #0 (0-e510f2, pid 1)"], ["worker #0 (0-2cc8e1, pid 1)"]) is None
    assert match(["s-2785fd online"], ["s-3c5c05 online"]) is None


def test_a_worker_id_is_an_index_or_s_and_six_hex_digits() -> None:
    assert match(["worker #0 (0-e510f2, pid 1)"], ["worker #0 (0-e510, pid 1)"]) is not None
    assert match(["s-2785fd online"], ["x-2785fd online"]) is not None


def test_digit_runs_differ_freely() -> None:
    assert (
        match(["restart done: serving from pid(s) 19362, 19363"], ["restart done: serving from pid(s) 5, 70001"])
        is None
    )
    assert match(["next attempt in 2.4s"], ["next attempt in 12.0s"]) is None


def test_digits_do_not_match_words() -> None:
    assert match(["generation 2 is serving"], ["generation - is serving"]) is not None
    assert match(["pid(s) 1, 2"], ["pid(s) 1"]) is not None


def test_whitespace_runs_are_collapsed() -> None:
    doc = "0-2cc8e1  31750  0        online     1    3s      0         app.0.sock"
    real = "0-a1b2c3  7  0      online  1  12s  0  app.0.sock   "
    assert match([doc], [real]) is None
    assert match(["app.0.sock -> app.0-75e27d.sock"], ["app.0.sock->app.0-75e27d.sock"]) is not None


def test_lines_match_one_for_one_in_order() -> None:
    assert match(["a", "b"], ["a", "b"]) is None
    assert match(["a", "b"], ["b", "a"]) == Mismatch(0, "a", 0, "b")
    assert match(["a", "b"], ["a"]) == Mismatch(1, "b", None, None)
    assert match(["a"], ["a", "b"]) == Mismatch(None, None, 1, "b")
    assert match(["a", "c"], ["a", "b", "c"]) is not None, "no silent skipping"


def test_an_ellipsis_line_stands_for_any_number_of_lines() -> None:
    assert match(["a", "…", "d"], ["a", "d"]) is None
    assert match(["a", "…", "d"], ["a", "b", "c", "d"]) is None
    assert match(["a", "  …"], ["a", "x", "y"]) is None
    assert match(["…"], []) is None


def test_the_lines_around_an_ellipsis_must_still_match() -> None:
    assert match(["a", "…", "d"], ["a", "b", "c"]) == Mismatch(2, "d", 1, "b"), "the first line d could be"
    assert match(["a", "…", "d"], ["x", "b", "d"]) == Mismatch(0, "a", 0, "x")
    assert match(["a …"], ["a", "b"]) is not None, "only a line that is just … is special"


def test_unordered_finds_every_doc_line_anywhere() -> None:
    assert match_unordered(["b", "a"], ["a", "x", "b"]) is None
    assert match_unordered(["worker #1 (1-eddd1a, pid 2)"], ["worker #0 (0-e510f2, pid 9)"]) is None


def test_unordered_needs_a_line_for_each_doc_line() -> None:
    assert match_unordered(["a", "c"], ["a", "b"]) == Mismatch(1, "c", None, None)
    assert match_unordered(["a", "a"], ["a", "b"]) is not None, "a repeated doc line needs two lines"


def test_a_comment_after_a_command_is_not_part_of_it() -> None:
    assert strip_comment("sockherd restart          # a new generation") == "sockherd restart"
    assert strip_comment("curl localhost:8000/ &        # waits …") == "curl localhost:8000/ &"
    assert strip_comment("echo '# not a comment' \"# nor this\" a#b") == "echo '# not a comment' \"# nor this\" a#b"
    assert strip_comment(r"echo \# x") == r"echo \# x"


MARKDOWN = """\
Text.

<!-- transcript: demo -->
```console
$ sockherd restart   # note
starting generation 2: 2 worker(s)
…
$ curl localhost:8000/ &
$ echo $?
0
```

- a list item:

  <!-- transcript: root-prompt unordered -->
  ```console
  # install -d /run/myapp
  # ls /run
  myapp
  ```

```console
$ pip install sockherd
```

```console
$ sockherd init
wrote /tmp/doc/myapp/sockherd.toml
# nginx (e.g. /etc/nginx/conf.d/myapp.conf):
```
"""


def test_blocks_are_parsed_with_lines_markers_and_prompts(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(MARKDOWN)
    demo, root, usage, init = parse_blocks(doc)
    assert (demo.line, demo.marker, demo.unordered, demo.has_output) == (4, "demo", False, True)
    assert [(c.text, c.line, c.background) for c in demo.commands] == [
        ("sockherd restart", 5, False),
        ("curl localhost:8000/ &", 8, True),
        ("echo $?", 9, False),
    ]
    assert demo.commands[0].expected == ("starting generation 2: 2 worker(s)", "…")
    assert (root.marker, root.unordered) == ("root-prompt", True)
    assert [(c.text, c.expected) for c in root.commands] == [("install -d /run/myapp", ()), ("ls /run", ("myapp",))]
    assert not usage.has_output and usage.marker is None
    # a block's prompt is its first line's: in a `$` block, `# ` lines are output
    assert init.commands[0].expected == (
        "wrote /tmp/doc/myapp/sockherd.toml",
        "# nginx (e.g. /etc/nginx/conf.d/myapp.conf):",
    )


def test_a_block_must_start_with_a_command(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("```console\noutput first\n```\n")
    with pytest.raises(ValueError, match="must start with"):
        parse_blocks(doc)


def test_the_report_names_the_block_the_command_and_the_line(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(MARKDOWN)
    demo = parse_blocks(doc)[0]
    report = check_block(demo, [["starting generation 3: 1 worker(s)"], [], ["bash: oops"]], {})
    assert report is not None
    assert "doc.md:4 [demo]: the output of `echo $?` (line 9)" in report
    assert "doc line 10: '0'" in report and "output line 1: 'bash: oops'" in report
    assert check_block(demo, [["starting generation 3: 1 worker(s)", "x"], [], ["5"]], {}) is None


def test_sockherd_invocations_are_found_in_a_command_line() -> None:
    assert sockherd_invocations("cd examples/hello && sockherd daemon --dev-server") == [["daemon", "--dev-server"]]
    assert sockherd_invocations("sockherd status --json | jq -r '.workers[] | .pid'; sockherd config | grep x") == [
        ["status", "--json"],
        ["config"],
    ]
    assert sockherd_invocations("sockherd daemon 2>>log &") == [["daemon"]]
    assert sockherd_invocations("sockherd daemon &>/tmp/log &") == [["daemon"]]
    assert sockherd_invocations("curl localhost:8000/") == []
