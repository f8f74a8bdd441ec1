"""The exposition writer (lbnode.admin.metrics) against the strict reader the metrics tests use."""

from __future__ import annotations

import pytest

from lbnode.admin.metrics import Exposition
from lbnode.histogram import BUCKETS, Histogram
from tests.promtext import FormatError, parse, value


def test_label_values_are_escaped_and_read_back() -> None:
    out = Exposition()
    name = 'we"ird\\pool\nname'
    out.add("fulcrum_x_total", "counter", "help", [((("pool", name),), 3)])
    text = out.text().decode()
    assert '\\"' in text and "\\\\" in text and "\\n" in text and "\nname" not in text
    assert value(parse(text), "fulcrum_x_total", pool=name) == 3


def test_histogram_is_cumulative_with_inf_equal_to_count() -> None:
    h = Histogram()
    for s in (0.0005, 0.001, 0.002, 0.3, 31.0):  # 0.001 lands in le="0.001" (upper bounds are inclusive)
        h.observe(s)
    out = Exposition()
    out.histogram("fulcrum_t_seconds", "help", [((("listener", "l"),), h)])
    samples = parse(out.text().decode())
    assert value(samples, "fulcrum_t_seconds_bucket", listener="l", le="0.001") == 2
    assert value(samples, "fulcrum_t_seconds_bucket", listener="l", le="0.0025") == 3
    assert value(samples, "fulcrum_t_seconds_bucket", listener="l", le=repr(BUCKETS[-1])) == 4
    assert value(samples, "fulcrum_t_seconds_bucket", listener="l", le="+Inf") == 5
    assert value(samples, "fulcrum_t_seconds_count", listener="l") == 5
    assert value(samples, "fulcrum_t_seconds_sum", listener="l") == pytest.approx(31.3035)


def test_empty_families_are_left_out() -> None:
    out = Exposition()
    out.add("fulcrum_none_total", "counter", "help", [])
    assert b"fulcrum_none_total" not in out.text()


@pytest.mark.parametrize(
    "text",
    [
        "# TYPE a counter\na 1\n",  # no HELP
        "# HELP a h\n# TYPE a counter\na 1",  # no final newline
        "# HELP a h\n# TYPE a counter\na 1\na 2\n",  # series twice
        "# HELP a h\n# TYPE a counter\na -1\n",  # negative counter
        "# HELP a h\n# TYPE a gauge\n# HELP b h\n# TYPE b gauge\na 1\nb 1\na{x=\"1\"} 2\n",  # a split
        '# HELP a h\n# TYPE a gauge\na{x="1} 1\n',  # unterminated label value
        "# HELP h h\n# TYPE h histogram\n"
        'h_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',  # not cumulative
        '# HELP h h\n# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 1\n',  # count differs
    ],
)
def test_the_reader_rejects_malformed_expositions(text: str) -> None:
    with pytest.raises(FormatError):
        parse(text)
