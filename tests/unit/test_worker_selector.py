"""Worker selectors: every term, inversion, unions, and the default."""

from __future__ import annotations

import re

import pytest

from sockherd.worker_selector import Candidate, SelectorError, parse_selector

HERD = [
    Candidate("0-aaaaaa", 0, 100),
    Candidate("1-bbbbbb", 1, 101),
    Candidate("2-cccccc", 2, 102),
    Candidate("3-dddddd", 3, 103),
    Candidate("s-eeeeee", None, 104),  # a standby
    Candidate("1-ffffff", None, 105),  # a new generation's worker, not published yet
]


def pick(text: str | None, self_id: str | None = None) -> list[str]:
    return [c.id for c in parse_selector(text).pick(HERD, self_id=self_id)]


def test_the_default_is_every_published_worker() -> None:
    assert pick(None) == pick("") == ["0-aaaaaa", "1-bbbbbb", "2-cccccc", "3-dddddd"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", ["3-dddddd"]),
        ("1-2", ["1-bbbbbb", "2-cccccc"]),
        ("-1", ["0-aaaaaa", "1-bbbbbb"]),
        ("2-", ["2-cccccc", "3-dddddd"]),
        ("$102", ["2-cccccc"]),
        ("$104", ["s-eeeeee"]),  # a standby by pid
        ("s-eeeeee", ["s-eeeeee"]),  # ... or by id
        ("1-ffffff", ["1-ffffff"]),  # an id, not the range 1..ffffff
        ("3,0", ["0-aaaaaa", "3-dddddd"]),  # a union, in slot order
        ("!0", ["1-bbbbbb", "2-cccccc", "3-dddddd"]),
        ("!1-2", ["0-aaaaaa", "3-dddddd"]),
        ("0-,!$101", ["0-aaaaaa", "2-cccccc", "3-dddddd"]),
        ("9", []),
    ],
)
def test_terms(text: str, expected: list[str]) -> None:
    assert pick(text) == expected


def test_slots_never_reach_a_standby() -> None:
    assert "s-eeeeee" not in pick("0-") and "s-eeeeee" not in pick("!0")


def test_self_and_not_self_from_a_worker() -> None:
    assert pick("self", self_id="2-cccccc") == ["2-cccccc"]
    assert pick("!self", self_id="2-cccccc") == ["0-aaaaaa", "1-bbbbbb", "3-dddddd"]
    with pytest.raises(SelectorError, match="'self' only means something in a message from a worker"):
        pick("!self")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x", "'x' is not a selector term"),
        ("$abc", "'$abc' is not a pid"),
        ("4-2", "range '4-2' is empty"),
        ("1,,2", "empty term"),
        ("!", "empty term"),
        ("-", "'-' is not a selector term"),
    ],
)
def test_bad_terms_are_named(text: str, message: str) -> None:
    with pytest.raises(SelectorError, match=re.escape(message)):
        parse_selector(text)
