"""A strict reader of the Prometheus text exposition format (0.0.4), for the metrics tests.

Stricter than Prometheus itself where that catches our mistakes: every family has HELP and
TYPE before its samples, a family's samples are contiguous, no series twice, histogram
buckets cumulative with +Inf equal to _count, counters never negative.
"""

from __future__ import annotations

import math
import re

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_SAMPLE = re.compile(rf"^({NAME})(\{{(.*)\}})? (\S+)$")
_PAIR = re.compile(rf'({LABEL})="((?:[^"\\]|\\["\\n])*)"(,|$)')
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", ""), "counter": ("",),
             "gauge": ("",), "untyped": ("",)}

Series = tuple[str, tuple[tuple[str, str], ...]]


class FormatError(AssertionError):
    pass


def _value(text: str, line: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    try:
        return float(text)
    except ValueError:
        raise FormatError(f"bad value in {line!r}") from None


def _labels(text: str, line: str) -> tuple[tuple[str, str], ...]:
    pairs, pos = [], 0
    while pos < len(text):
        m = _PAIR.match(text, pos)
        if m is None:
            raise FormatError(f"bad labels in {line!r}")
        value = m.group(2).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        pairs.append((m.group(1), value))
        pos = m.end()
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        raise FormatError(f"label twice in {line!r}")
    return tuple(sorted(pairs))


def parse(text: str) -> dict[Series, float]:
    """Every sample by (name, sorted labels); raises FormatError on anything off."""
    if not text.endswith("\n"):
        raise FormatError("the exposition must end with a newline")
    samples: dict[Series, float] = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    done: set[str] = set()  # families whose samples are over
    current: str | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            if name in helps or not re.fullmatch(NAME, name):
                raise FormatError(f"HELP again or bad name: {line!r}")
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            parts = line.split(" ")
            if len(parts) != 4 or parts[3] not in _SUFFIXES or parts[2] in types:
                raise FormatError(f"bad TYPE line: {line!r}")
            if parts[2] not in helps:
                raise FormatError(f"TYPE without HELP first: {line!r}")
            types[parts[2]] = parts[3]
            continue
        if line.startswith("#") or not line:
            raise FormatError(f"unexpected line {line!r}")
        m = _SAMPLE.match(line)
        if m is None:
            raise FormatError(f"bad sample line {line!r}")
        name, labels, value = m.group(1), _labels(m.group(3) or "", line), _value(m.group(4), line)
        family = next((f for f in types for s in _SUFFIXES[types[f]] if name == f + s), None)
        if family is None:
            raise FormatError(f"sample without TYPE: {line!r}")
        if family != current:
            if family in done:
                raise FormatError(f"samples of {family} are not together: {line!r}")
            if current is not None:
                done.add(current)
            current = family
        if (name, labels) in samples:
            raise FormatError(f"series twice: {line!r}")
        if types[family] == "counter" and (value < 0 or math.isnan(value)):
            raise FormatError(f"negative counter: {line!r}")
        samples[(name, labels)] = value
    for family, kind in types.items():
        if kind == "histogram":
            _check_histogram(family, samples)
    return samples


def _check_histogram(family: str, samples: dict[Series, float]) -> None:
    groups: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for (name, labels), v in samples.items():
        if name == family + "_bucket":
            le = dict(labels)["le"]
            rest = tuple(p for p in labels if p[0] != "le")
            groups.setdefault(rest, []).append((float(le.replace("Inf", "inf")), v))
    for rest, buckets in groups.items():
        buckets.sort()
        counts = [c for _, c in buckets]
        if counts != sorted(counts) or buckets[-1][0] != math.inf:
            raise FormatError(f"{family}{dict(rest)}: buckets not cumulative or no +Inf: {buckets}")
        if samples.get((family + "_count", rest)) != counts[-1] or (family + "_sum", rest) not in samples:
            raise FormatError(f"{family}{dict(rest)}: _count differs from the +Inf bucket or _sum missing")


def value(samples: dict[Series, float], name: str, **labels: str) -> float:
    """One series' value (0 when absent: a counter never incremented may be left out)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[Series, float], name: str, **labels: str) -> float:
    """Sum over the series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))
