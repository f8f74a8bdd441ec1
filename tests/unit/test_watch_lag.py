from lbnode.cluster.sync import WatchLag


def test_caught_up_while_the_applied_revision_keeps_up_with_the_store() -> None:
    lag = WatchLag()
    lag.observed(store_revision=10, applied=10, now=1.0)
    assert lag.seconds(5.0) == 0.0 and lag.store_revision == 10
    lag.observed(store_revision=10, applied=12, now=2.0)  # the watch ran ahead of the read
    assert lag.seconds(5.0) == 0.0


def test_lag_counts_from_the_first_read_that_found_a_newer_write_until_it_is_applied() -> None:
    lag = WatchLag()
    lag.observed(store_revision=20, applied=15, now=100.0)
    assert lag.seconds(100.0) == 0.0 and lag.seconds(103.5) == 3.5
    lag.observed(store_revision=21, applied=15, now=101.0)  # a later read does not restart it
    assert lag.seconds(104.0) == 4.0
    lag.caught_up(20)  # not yet: the store has 21
    assert lag.seconds(104.0) == 4.0
    lag.caught_up(21)
    assert lag.seconds(104.0) == 0.0


def test_a_store_read_older_than_one_already_seen_does_not_clear_the_lag() -> None:
    lag = WatchLag()
    lag.observed(store_revision=30, applied=25, now=0.0)
    lag.observed(store_revision=28, applied=28, now=1.0)  # an older reply, e.g. from a lagging member
    assert lag.store_revision == 30 and lag.seconds(2.0) == 2.0


def test_a_clock_that_steps_back_gives_zero_not_a_negative_lag() -> None:
    lag = WatchLag()
    lag.observed(store_revision=2, applied=1, now=50.0)
    assert lag.seconds(49.0) == 0.0
