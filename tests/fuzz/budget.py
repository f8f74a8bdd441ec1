"""How long each fuzz target runs, and the tally it reports.

``FUZZ_SECONDS`` unset (the normal suite): a short, derandomized run with a fixed
number of examples, so the harness cannot rot. Set (``make fuzz``): each target runs
fresh random examples for its share of the seconds. Never decides a verdict.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable

from hypothesis import HealthCheck, settings

# Share of FUZZ_SECONDS per target: the end-to-end one is ~100x slower per example
# (real sockets, a real node), so it gets most of the time to reach a useful count.
SHARES = {"requests": 0.2, "responses": 0.1, "proxy": 0.7}
# Examples per call of a hypothesis test in the long run: small enough that the time
# budget is checked often, large enough that each call explores and shrinks properly.
BATCH = 200

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def fuzz_seconds() -> float | None:
    raw = os.environ.get("FUZZ_SECONDS")
    return float(raw) if raw else None


def short_settings(examples: int) -> settings:
    """The suite's run: the same examples every time."""
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=_SUPPRESS)


def long_settings(examples: int = BATCH) -> settings:
    return settings(max_examples=examples, derandomize=False, deadline=None, database=None,
                    suppress_health_check=_SUPPRESS)


def run(target: str, build: Callable[[settings], Callable[[], None]], short_examples: int,
        tally: Counter[str]) -> None:
    """Run ``build(settings)()`` once (short) or again and again for the target's share."""
    seconds = fuzz_seconds()
    started = time.monotonic()
    if seconds is None:
        build(short_settings(short_examples))()
    else:
        budget = seconds * SHARES[target]
        test = build(long_settings())
        while time.monotonic() - started < budget:
            test()
    elapsed = time.monotonic() - started
    total = sum(v for k, v in tally.items() if not k.startswith("note:"))
    lines = [f"fuzz {target}: {total} examples in {elapsed:.1f}s"]
    lines += [f"  {k}: {v}" for k, v in sorted(tally.items(), key=lambda kv: -kv[1])]
    print("\n".join(lines))
