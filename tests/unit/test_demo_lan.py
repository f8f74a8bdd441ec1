"""The cluster demo's choice of its LAN: a /24 of 198.18.0.0/15 that the root namespace does not use."""

from ipaddress import IPv4Network

import pytest

from lbnode.demo_lan import LanError, first_free


def test_first_slash_24_when_nothing_uses_the_range():
    assert first_free([IPv4Network("192.0.2.0/24"), IPv4Network("127.0.0.0/8")]) == IPv4Network("198.18.0.0/24")


def test_skips_what_an_address_or_a_route_covers():
    used = [IPv4Network("198.18.0.0/24"), IPv4Network("198.18.1.7/32"), IPv4Network("198.18.2.0/23")]
    assert first_free(used) == IPv4Network("198.18.4.0/24")


def test_a_default_route_does_not_count():
    assert first_free([IPv4Network("0.0.0.0/0")]) == IPv4Network("198.18.0.0/24")


def test_a_route_over_the_whole_range_leaves_nothing():
    with pytest.raises(LanError, match="no free /24 left in 198.18.0.0/15"):
        first_free([IPv4Network("198.16.0.0/12")])
