"""The test helpers themselves: the slowdown setting and the waits say what they waited for."""

from __future__ import annotations

import itertools

import pytest

from tests import helpers
from tests.helpers import scaled, wait_changes, wait_for, wait_until


@pytest.mark.parametrize(("raw", "factor"), [("", 1.0), ("1", 1.0), ("2.5", 2.5), (" 4 ", 4.0)])
def test_the_slowdown_is_a_positive_factor_defaulting_to_one(monkeypatch, raw, factor):
    monkeypatch.setenv(helpers.SLOWDOWN_ENV, raw)
    assert helpers._read_slowdown() == factor


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "inf", "nan"])
def test_a_slowdown_that_is_not_a_positive_number_is_refused_with_the_setting_named(monkeypatch, raw):
    monkeypatch.setenv(helpers.SLOWDOWN_ENV, raw)
    with pytest.raises(ValueError, match=f"{helpers.SLOWDOWN_ENV}=.*must be a positive number"):
        helpers._read_slowdown()


def test_scaled_multiplies_by_the_factor(monkeypatch):
    monkeypatch.setattr(helpers, "SLOWDOWN", 3.0)
    assert scaled(10) == 30.0


def test_wait_until_returns_the_value_that_ended_the_wait():
    values = itertools.count()
    assert wait_until(lambda: next(values) >= 3 and "done", "the count to reach 3", every=0) == "done"


def test_wait_until_fails_with_what_it_waited_for_and_what_it_saw(monkeypatch):
    monkeypatch.setattr(helpers, "SLOWDOWN", 2.0)
    with pytest.raises(pytest.fail.Exception) as failed:
        wait_until(lambda: False, "the moon", timeout=0.05, seen=lambda: ["job 1 queued"], every=0.01)
    text = str(failed.value)
    assert "timed out after 0.05 s (0.1 s with IMAGEQC_TEST_SLOWDOWN=2) waiting for the moon" in text
    assert "last seen: ['job 1 queued']" in text


def test_wait_until_reports_a_seen_callback_that_itself_fails():
    def broken():
        raise OSError("database is locked")

    with pytest.raises(pytest.fail.Exception, match=r"could not read it: OSError\('database is locked'\)"):
        wait_until(lambda: None, "anything", timeout=0.01, seen=broken, every=0.01)


def test_wait_for_answers_instead_of_failing():
    assert wait_for(lambda: True, timeout=0.01)
    assert not wait_for(lambda: False, timeout=0.01, every=0.005)


def test_wait_changes_counts_changes_not_readings():
    readings = iter([None, 1, 1, None, 1, 2, 2, 3])
    wait_changes(lambda: next(readings), 2, "the value to change", every=0)  # to 1, then to 2; a None is no change
    with pytest.raises(pytest.fail.Exception, match=r"the value to change \(2 times\).*last seen: '0 so far'"):
        wait_changes(lambda: 7, 2, "the value to change", timeout=0.02, every=0.005)
