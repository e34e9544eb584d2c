"""config_scan reads a few top-level string keys without tomllib: whenever it answers, tomllib agrees.

The property test generates TOML files around the keys it reads: top-level keys of every
kind of value (one-line and multi-line strings holding what looks like keys, headers and
comments, nested arrays over several lines with comments, inline tables), dotted and
quoted keys, then tables that set the same names. Whenever the scanner answers (it may
say it is unsure), its values are tomllib's. The examples below pin that it does answer
for the files people write (``sockherd init``'s, the bundled examples'), so that the
CLI's fast path really skips tomllib.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockherd.config_scan import scan
from sockherd.init import LISTEN_CONFIG, STARTER_CONFIG

NAMES = frozenset({"tmp_dir", "ipc_file", "extends"})
EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*/sockherd.toml"))

# Text that a naive line reader would take for something else.
TRICKY = st.sampled_from(['tmp_dir = "/evil"', "[table]", "# not a comment", "]", "[", "{", "}", "=", "#", "'", '"'])
TEXT = st.lists(st.one_of(TRICKY, st.text(alphabet="abc /._-é", max_size=6)), max_size=4).map("".join)
BARE_KEYS = st.sampled_from(["tmp_dir", "ipc_file", "extends", "workers", "command", "environment", "name", "a-b"])


def basic_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def literal_string(text: str) -> str | None:
    return None if "'" in text else "'" + text + "'"


@st.composite
def strings(draw: st.DrawFn) -> str:
    text = draw(TEXT)
    kind = draw(st.sampled_from(["basic"] * 5 + ["literal"] * 3 + ["multi-basic", "multi-literal"]))
    if kind == "literal" and (rendered := literal_string(text)) is not None:
        return rendered
    if kind == "multi-basic":
        return '"""\n' + text.replace("\\", "\\\\").replace('"', '\\"') + "\n" + draw(TRICKY).replace('"', "") + '"""'
    if kind == "multi-literal" and "'" not in text:
        return "'''\n" + text + "\n" + draw(TRICKY).replace("'", "") + "'''"
    return basic_string(text)


def values(depth: int = 2) -> st.SearchStrategy[str]:
    scalars = st.one_of(
        strings(),
        st.integers(-10, 10**6).map(str),
        st.sampled_from(["true", "false", "1.5", "-0.0", "1979-05-27", "inf"]),
    )
    if depth == 0:
        return scalars
    inner = values(depth - 1)
    return st.one_of(scalars, arrays(inner), inline_tables(inner))


@st.composite
def arrays(draw: st.DrawFn, inner: st.SearchStrategy[str]) -> str:
    items = draw(st.lists(inner, max_size=3))
    if not draw(st.booleans()):
        return "[" + ", ".join(items) + "]"
    lines = [f"  {item},{draw(st.sampled_from(['', '  # ' + draw(TEXT).replace(chr(10), '')]))}" for item in items]
    return "[\n" + "\n".join(lines) + "\n]"


@st.composite
def inline_tables(draw: st.DrawFn, inner: st.SearchStrategy[str]) -> str:
    keys = draw(st.lists(BARE_KEYS, max_size=3, unique=True))
    items = [f"{key} = {draw(inner)}" for key in keys]
    return "{" + ", ".join(items) + "}" if all("\n" not in item for item in items) else "{}"


@st.composite
def key_lines(draw: st.DrawFn, key: str) -> str:
    form = draw(st.sampled_from(["bare"] * 6 + ["dotted", "quoted"]))
    if form == "dotted":
        key = f"{key}.{draw(BARE_KEYS)}"
    elif form == "quoted":
        key = basic_string(key) if draw(st.booleans()) else f"'{key}'"
    plain = key in NAMES and form == "bare" and draw(st.booleans())  # the scanner's case: often
    value = draw(strings() if plain else values())
    space = draw(st.sampled_from(["", " ", "  ", "\t"]))
    comment = draw(st.sampled_from(["", " # " + draw(TEXT).replace("\n", "")]))
    return f"{draw(st.sampled_from(['', '  ']))}{key}{space}={space}{value}{comment}"


@st.composite
def documents(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for key in draw(st.lists(BARE_KEYS, max_size=6, unique=True)):
        lines.extend(draw(st.lists(st.sampled_from(["", "# a comment", "  # [table]"]), max_size=2)))
        lines.append(draw(key_lines(key)))
    for table in draw(st.lists(st.sampled_from(["[environment]", "[[hooks]]", "[tool.sockherd]"]), max_size=2)):
        lines.append(table)
        lines.extend(draw(key_lines(key)) for key in draw(st.lists(BARE_KEYS, max_size=3, unique=True)))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + draw(st.sampled_from(["", newline]))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_whenever_the_scanner_answers_tomllib_agrees(document: str) -> None:
    try:
        parsed = tomllib.loads(document)
    except tomllib.TOMLDecodeError:
        return  # not TOML (a dotted key over a string, a table defined twice): nothing to agree with
    found = scan(document, NAMES)
    if found is None:
        return
    for name in NAMES:
        if name in found:
            assert parsed.get(name) == found[name], (name, document)
        else:
            assert not isinstance(parsed.get(name), str), (name, document)


@pytest.mark.parametrize(
    "document",
    [STARTER_CONFIG.format(name="app"), LISTEN_CONFIG.format(name="app")] + [path.read_text() for path in EXAMPLES],
    ids=["init", "init-listen", *(path.parent.name for path in EXAMPLES)],
)
def test_the_files_people_write_are_read_without_tomllib(document: str) -> None:
    found = scan(document, NAMES)
    assert found is not None
    parsed = tomllib.loads(document)
    assert found == {name: parsed[name] for name in NAMES if name in parsed}


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("tmp_dir = \"/run/app\"  # where\nipc_file = 'x.ipc'\n", {"tmp_dir": "/run/app", "ipc_file": "x.ipc"}),
        ('command = [\n  ["a", "b # c"],  # [x]\n  \'tmp_dir = "no"\',\n]\ntmp_dir = "/t"\n', {"tmp_dir": "/t"}),
        ('[environment]\ntmp_dir = "/not/top-level"\n', {}),
        ('environment.tmp_dir = "/not/top-level"\n', {}),
        ('tmp_dir = "/t"\r\nworkers = 2\r\n', {"tmp_dir": "/t"}),
        ('name = "a"\n  [table]\ntmp_dir = "/in/table"\n', {}),
        # An escaped quote does not end a string: the bracket after it is text, not an array.
        ('x = "\\"[\\""\ntmp_dir = "/t"\ny = "\\"]\\""\n', {"tmp_dir": "/t"}),
    ],
)
def test_what_it_reads(document: str, expected: dict[str, str]) -> None:
    assert scan(document, NAMES) == expected


@pytest.mark.parametrize(
    "document",
    [
        '"tmp_dir" = "/quoted/key"\n',
        'tmp_dir = "/with\\\\escape"\n',
        'tmp_dir = """/multi"""\n',
        'description = """\ntmp_dir = "/inside/a/string"\n"""\n',
        "tmp_dir = 42\n",
        'tmp_dir = "/a"\ntmp_dir = "/b"\n',
        'tmp_dir.x = "/dotted"\n',
        'tmp_dir = "/a" "/b"\n',
        "\ufefftmp_dir = '/bom'\n",
        "command = [\n",
        'name = "a"\n[ipc_file]\nx = 1\n',
        'tmp_dir = "/t"\n[[extends]]\n',
    ],
    ids=[
        "quoted-key",
        "escape",
        "multi-line-value",
        "multi-line-elsewhere",
        "not-a-string",
        "twice",
        "dotted",
        "junk",
        "bom",
        "unclosed",
        "a-name-as-a-table",
        "a-name-as-an-array-of-tables",
    ],
)
def test_it_says_when_it_is_unsure(document: str) -> None:
    assert scan(document, NAMES) is None
