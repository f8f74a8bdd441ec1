"""The suite's property tests are derandomized (tests/conftest.py): the same examples each run,
so none fails CI by chance; ``make explore`` (HYPOTHESIS_EXPLORE=1) draws fresh ones."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from tests.unit import test_vip_placement


@pytest.mark.skipif(bool(os.environ.get("HYPOTHESIS_EXPLORE")), reason="make explore: random on purpose")
def test_the_suites_property_tests_run_the_same_examples_every_time() -> None:
    assert settings.default.derandomize
    # A test's own @settings (more examples, no deadline) keeps the profile's derandomize.
    own = test_vip_placement.test_placement_settles_fairly_and_never_flaps._hypothesis_internal_use_settings  # type: ignore[attr-defined]
    assert own.max_examples == 200 and own.derandomize
