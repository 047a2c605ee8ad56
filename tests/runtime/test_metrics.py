"""Counter: one series per label set, whatever the keyword order; wrong labels always refused."""

from __future__ import annotations

import pytest

from engine.runtime.metrics import Counter


def test_keyword_order_does_not_split_a_series() -> None:
    counter = Counter("linkcrm_test_total", "a test counter", ("event", "source"))
    counter.inc(event="install.tracked", source="tolinku")
    counter.inc(source="tolinku", event="install.tracked")
    counter.inc(2, event="install.tracked", source="tolinku")
    assert counter.value(source="tolinku", event="install.tracked") == 4
    assert counter.samples() == [((("event", "install.tracked"), ("source", "tolinku")), 4.0)]


@pytest.mark.parametrize("labels", [{"event": "a"}, {"event": "a", "source": "b", "x": "c"},
                                    {"event": "a", "sauce": "b"}])
def test_wrong_labels_are_refused_every_time(labels: dict[str, str]) -> None:
    counter = Counter("linkcrm_test_total", "a test counter", ("event", "source"))
    for _ in range(2):  # the checked label sets are remembered; unchecked ones never are
        with pytest.raises(ValueError, match="takes labels"):
            counter.inc(**labels)
    assert counter.samples() == []
