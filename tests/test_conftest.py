"""tests/conftest.py: the time limit of a default-tier test (its wall time and its CPU time)."""

import gc

import pytest
from conftest import DEFAULT_TEST_SECONDS, CollectionClock, default_tier_seconds, too_slow_message


def test_a_default_tier_test_fails_only_when_slow_in_wall_and_cpu_time_unless_marked_or_unlimited():
    limit = DEFAULT_TEST_SECONDS
    assert limit == 2.0 and too_slow_message("t.py::test_x", [], 1.0, 1.0, limit) is None
    assert too_slow_message("t.py::test_x", [], 30.0, 1.5, limit) is None  # it waited for a busy machine
    assert too_slow_message("t.py::test_x", [], 1.5, 3.0, limit) is None  # several threads, quick in wall time
    assert too_slow_message("t.py::test_x", [], 2.0, 2.0, limit) is None  # more than the limit fails, not equal
    assert too_slow_message("t.py::test_x[a]", ["parametrize"], 2.5, 3.25, limit) == (
        "t.py::test_x[a] took 2.50 s of wall time and 3.25 s of CPU time (garbage collection left out), more "
        "than the default tier's 2 s (JEM_TF_TEST_SECONDS): make it faster or mark it @pytest.mark.integration")
    # The garbage collector's time (what earlier tests left behind) counts for neither.
    assert too_slow_message("t.py::test_x", [], 2.6, 2.6, limit, gc_seconds=0.7) is None
    assert "2.40 s of wall time" in too_slow_message("t.py::test_x", [], 3.4, 3.4, limit, gc_seconds=1.0)
    for mark in ("integration", "slow"):
        assert too_slow_message("t.py::test_x", ["parametrize", mark], 60.0, 60.0, limit) is None
    assert too_slow_message("t.py::test_x", [], 60.0, 60.0, 0.0) is None  # JEM_TF_TEST_SECONDS=0: no limit
    assert "5 s" in too_slow_message("t.py::test_x", [], 6.0, 6.0, 5.0)
    # The limit: 2 s, or the variable's seconds; anything else is a usage error naming the value.
    assert default_tier_seconds({}) == default_tier_seconds({"JEM_TF_TEST_SECONDS": " "}) == 2.0
    assert default_tier_seconds({"JEM_TF_TEST_SECONDS": "0"}) == 0.0
    assert default_tier_seconds({"JEM_TF_TEST_SECONDS": " 5.5 "}) == 5.5
    for bad in ("-1", "fast", "nan", "inf"):
        with pytest.raises(pytest.UsageError, match=f"JEM_TF_TEST_SECONDS must be a number of seconds >= 0 "
                                                    rf"\(0: no limit\); received '{bad}'"):
            default_tier_seconds({"JEM_TF_TEST_SECONDS": bad})


def test_the_collection_clock_counts_the_garbage_collectors_time():
    clock = CollectionClock()
    gc.callbacks.append(clock)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(clock)
    assert 0 < clock.seconds < 5
