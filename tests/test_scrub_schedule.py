"""When the background scrub starts its next pass (engine/lifecycle/scrub.py): at a fixed
rate after a short pause; at "week" or "day" once the period since the last pass began has
run out, so that a small archive, whose pass MIN_RATE finishes early, is not read again
(and audited again) every few seconds."""
from __future__ import annotations

import pytest

from stowage.engine.lifecycle.scrub import PASS_PAUSE_S, ScrubState, next_pass_in

pytestmark = pytest.mark.unit
DAY = 86400.0


def test_a_fixed_rate_passes_again_after_the_pause():
    assert next_pass_in(ScrubState(passes=3, pass_started=1000.0), 1e6, 0.0, 1010.0) == PASS_PAUSE_S


def test_a_period_waits_until_it_has_run_out_since_the_last_pass_began():
    state = ScrubState(passes=1, pass_started=1000.0)
    assert next_pass_in(state, 0.0, 7 * DAY, 1000.0 + 3600) == pytest.approx(7 * DAY - 3600)
    assert next_pass_in(state, 0.0, 7 * DAY, 1000.0 + 8 * DAY) == PASS_PAUSE_S  # overdue: after the pause


def test_no_pass_yet_starts_after_the_pause():
    assert next_pass_in(ScrubState(), 0.0, DAY, 5000.0) == PASS_PAUSE_S
