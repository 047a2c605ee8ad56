"""The pacer's shape: never more than a CRM's limit through any rolling window, and most of it
used (HubSpot 100 per 10 s, Pipedrive 20 requests and 10 searches per 2 s, and others)."""

from __future__ import annotations

import pytest

from engine.targets.pacing import pacer_shape


@pytest.mark.parametrize(("limit", "window", "used"), [
    (100, 10.0, 0.9), (190, 10.0, 0.9), (20, 1.0, 0.85), (20, 2.0, 0.9), (40, 2.0, 0.9),
    (120, 2.0, 0.9), (50, 0.5, 0.85), (10, 2.0, 0.85), (5, 1.0, 0.6), (3, 2.0, 0.3),
    (2, 2.0, 0.2)])
def test_pacer_shape_never_lets_more_than_the_limit_through_any_window(
        limit: int, window: float, used: float) -> None:
    capacity, refill_window = pacer_shape(limit, window)
    rate = capacity / refill_window
    # A greedy client on a simulated clock: take a token whenever one is there.
    tokens, now, step, sent = capacity, 0.0, 0.001, []
    while now < 6 * window:
        tokens = min(capacity, tokens + rate * step)
        if tokens >= 1:
            tokens -= 1
            sent.append(now)
        now += step
    busiest = max(sum(1 for t in sent if start <= t < start + window) for start in sent)
    assert busiest < limit  # one request of margin for jitter between our clock and the CRM's
    assert len(sent) >= used * limit * 6
