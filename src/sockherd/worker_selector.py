"""Worker selectors (``-w``): which workers a message or a request goes to.

    3          the worker published in slot 3
    2-4 -4 2-  slots 2 to 4, up to 4, from 2
    $1234      the worker with pid 1234 (a standby too)
    0-3fa9c1   the worker with that id (a standby too: s-2785fd)
    self       the worker that sends (only from a worker)
    !TERM      every worker the rest selects, but not TERM
    a,b,c      the union

Without a positive term the base is every published worker (the default, "all online
workers"), so ``!0`` is every published worker but slot 0 and ``!self`` every published
worker but the sender. Slot terms match published workers only; pid and id terms match
any live worker, so a standby is reached only by its id or pid.

Pure: parsing and picking take plain values, so every rule is unit-tested.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Candidate", "Selector", "SelectorError", "parse_selector"]

_ID = re.compile(r"(?:\d+|s)-[0-9a-f]{6}")
_RANGE = re.compile(r"(?P<low>\d+)?-(?P<high>\d+)?")
MAX_TERMS = 256


class SelectorError(ValueError):
    """A selector that cannot be parsed or applied; the message names the term."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """What picking needs to know of a live worker."""

    id: str
    index: int | None  # its slot when published, else None
    pid: int | None


@dataclass(frozen=True, slots=True)
class _Term:
    negated: bool
    kind: str  # "slots", "pid", "id", "self"
    low: int | None = None
    high: int | None = None
    value: str | int | None = None

    def matches(self, candidate: Candidate, self_id: str | None) -> bool:
        if self.kind == "slots":
            index = candidate.index
            if index is None:
                return False
            return (self.low is None or index >= self.low) and (self.high is None or index <= self.high)
        if self.kind == "pid":
            return candidate.pid == self.value
        if self.kind == "id":
            return candidate.id == self.value
        return candidate.id == self_id  # self


@dataclass(frozen=True, slots=True)
class Selector:
    text: str
    terms: tuple[_Term, ...]

    @property
    def needs_self(self) -> bool:
        return any(term.kind == "self" for term in self.terms)

    def pick(self, candidates: Iterable[Candidate], *, self_id: str | None = None) -> list[Candidate]:
        """The selected workers, published ones in slot order, then the others by id."""
        if self.needs_self and self_id is None:
            raise SelectorError(f"-w {self.text!r}: 'self' only means something in a message from a worker")
        every = list(candidates)
        positives = [t for t in self.terms if not t.negated]
        negatives = [t for t in self.terms if t.negated]
        if positives:
            base = [c for c in every if any(t.matches(c, self_id) for t in positives)]
        else:
            base = [c for c in every if c.index is not None]  # the default: every published worker
        chosen = [c for c in base if not any(t.matches(c, self_id) for t in negatives)]
        return sorted(chosen, key=lambda c: (c.index is None, c.index if c.index is not None else 0, c.id))


DEFAULT = Selector("", ())


def parse_selector(text: str | None) -> Selector:
    """Parse ``-w``; None or empty is the default (every published worker)."""
    if text is None or not text.strip():
        return DEFAULT
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > MAX_TERMS:
        raise SelectorError(f"-w: {len(parts)} terms; at most {MAX_TERMS}")
    return Selector(text, tuple(_parse_term(part, text) for part in parts))


def _parse_term(part: str, text: str) -> _Term:
    negated = part.startswith("!")
    body = part[1:].strip() if negated else part
    if not body:
        raise SelectorError(f"-w {text!r}: empty term")
    if body == "self":
        return _Term(negated, "self")
    if body.startswith("$"):
        if not body[1:].isdigit():
            raise SelectorError(f"-w {text!r}: {body!r} is not a pid ($ and digits, e.g. $1234)")
        return _Term(negated, "pid", value=int(body[1:]))
    if body.isdigit():
        return _Term(negated, "slots", low=int(body), high=int(body))
    if _ID.fullmatch(body):
        return _Term(negated, "id", value=body)
    if (match := _RANGE.fullmatch(body)) and (match["low"] or match["high"]):
        low = int(match["low"]) if match["low"] else None
        high = int(match["high"]) if match["high"] else None
        if low is not None and high is not None and low > high:
            raise SelectorError(f"-w {text!r}: range {body!r} is empty (write it low-high)")
        return _Term(negated, "slots", low=low, high=high)
    raise SelectorError(
        f"-w {text!r}: {body!r} is not a selector term (a slot 3, a range 2-4/-4/2-, a pid $1234, "
        "a worker id like 0-3fa9c1, or self; ! inverts)"
    )
