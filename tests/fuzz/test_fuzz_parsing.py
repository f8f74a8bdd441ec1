"""Fuzz the request and response parsers against h11, with hypothesis (see tests/fuzz/budget.py).

A verdict other than agreement, a clean refusal or a known finding fails the test
with the shrunk input. Pure: no sockets.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import budget
from tests.fuzz.reference import (
    compare,
    ours_requests,
    ours_response,
    reference_requests,
    reference_response,
)
from tests.fuzz.strategies import request_stream, response_bytes, splits

# The listener default (model.Listener.max_header_bytes), so huge fields hit the real limit.
MAX_HEADER_BYTES = 64 * 1024


def _no_known_response_issue(_msg: object) -> None:
    return None


def test_request_parsing_agrees_with_h11_or_refuses() -> None:
    tally: Counter[str] = Counter()

    def build(s):  # type: ignore[no-untyped-def]
        @s
        @given(data=st.one_of(request_stream(), st.binary(max_size=200)), pieces=st.data())
        def check(data: bytes, pieces: st.DataObject) -> None:
            whole = ours_requests([data], MAX_HEADER_BYTES)
            cut = ours_requests(pieces.draw(splits(data)), MAX_HEADER_BYTES)
            # How the bytes arrive must not change what they mean.
            assert (cut.messages, cut.end, cut.partial) == (whole.messages, whole.end, whole.partial), (
                f"split-dependent reading: whole {whole} cut {cut}"
            )
            verdict = compare(whole, reference_requests(data, MAX_HEADER_BYTES))
            tally[verdict.kind] += 1
            if verdict.kind == "stricter" and whole.messages == []:
                tally[f"note: only we refuse: {whole.reason[:60]}"] += 1
            assert verdict.kind != "mismatch", verdict.detail

        return check

    budget.run("requests", build, 400, tally)


def test_response_parsing_agrees_with_h11_or_refuses() -> None:
    tally: Counter[str] = Counter()

    def build(s):  # type: ignore[no-untyped-def]
        @s
        @given(data=st.one_of(response_bytes(), st.binary(max_size=200)),
               method=st.sampled_from([b"GET", b"HEAD", b"POST"]), pieces=st.data())
        def check(data: bytes, method: bytes, pieces: st.DataObject) -> None:
            whole = ours_response([data], method)
            cut = ours_response(pieces.draw(splits(data)), method)
            assert (cut.messages, cut.end) == (whole.messages, whole.end), (
                f"split-dependent reading: whole {whole} cut {cut}"
            )
            verdict = compare(whole, reference_response(data, method), _no_known_response_issue)
            tally[verdict.kind] += 1
            if verdict.kind == "stricter" and whole.messages == []:
                tally[f"note: only we refuse: {whole.reason[:60]}"] += 1
            assert verdict.kind != "mismatch", verdict.detail

        return check

    budget.run("responses", build, 400, tally)
