"""Failure scope: when a failed try is its endpoint's alone, and when it is the service's."""

from __future__ import annotations

from sidecar.upstream.endpoint import EndpointState, isolated_failure

NOW = 1000.0


def endpoints(n: int) -> list[EndpointState]:
    return [EndpointState(("127.0.0.1", 8000 + i)) for i in range(n)]


def test_a_failure_is_isolated_while_another_endpoint_in_use_still_answers() -> None:
    bad, good = endpoints(2)
    bad.failing = True
    assert isolated_failure(bad, [bad, good], NOW)
    good.failing = True  # now both fail: the service does
    assert not isolated_failure(bad, [bad, good], NOW)
    assert not isolated_failure(good, [bad, good], NOW)


def test_a_failure_of_the_only_endpoint_is_the_services() -> None:
    [only] = endpoints(1)
    assert not isolated_failure(only, [only], NOW)


def test_endpoints_out_of_use_do_not_make_a_failure_isolated() -> None:
    """An ejected or unhealthy endpoint gets no traffic: it cannot carry the service."""
    bad, ejected, down = endpoints(3)
    ejected.ejected_until = NOW + 30
    down.healthy = False
    assert not isolated_failure(bad, [bad, ejected, down], NOW)
    assert isolated_failure(bad, [bad, ejected, down], NOW + 30)  # the ejection ended


def test_an_endpoint_not_tried_yet_counts_as_answering() -> None:
    """Optimistic, like health: at start-up the first failures of a bad endpoint are its own."""
    tried, fresh = endpoints(2)
    assert isolated_failure(tried, [tried, fresh], NOW)
