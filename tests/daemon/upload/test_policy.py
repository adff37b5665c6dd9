"""Upload policy: modes, key layout, daily windows (clock passed in), backoff, retries, the throttle."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.errors import PermanentUploadError, TransientUploadError
from daemon.upload.policy import UploadWindow, kinds_for_mode, render_key, retrying, run_id
from daemon.upload.throttle import Throttle

UTC = timezone.utc
CST = timezone(timedelta(hours=8))


def at(hour: int, minute: int = 0, *, day: int = 12, tz: timezone = UTC) -> float:
    return datetime(2024, 6, day, hour, minute, tzinfo=tz).timestamp()


@pytest.mark.parametrize(
    ("mode", "kinds"),
    [("none", ()), ("inputs", ("inputs",)), ("outputs", ("outputs",)), ("all", ("inputs", "outputs"))],
)
def test_mode_selects_the_kinds_uploaded(mode, kinds):
    assert kinds_for_mode(mode) == kinds


def test_an_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="none, inputs, outputs or all"):
        kinds_for_mode("everything")


def test_the_default_key_layout_and_an_empty_prefix():
    f = {
        "site": "shenzhen-1",
        "chip": "SS200000135TL_D1",
        "run": "SS200000135TL_D1_20240612_101500_0.1.0",
        "name": "SS200000135TL_D1.tif",
        "kind": "inputs",
        "date": "20240612",
    }
    tpl = "{prefix}/{site}/{chip}/{run}/{name}"
    assert (
        render_key(tpl, prefix="stereo/qc", **f)
        == "stereo/qc/shenzhen-1/SS200000135TL_D1/SS200000135TL_D1_20240612_101500_0.1.0/SS200000135TL_D1.tif"
    )
    assert (
        render_key(tpl, prefix="", **f)
        == "shenzhen-1/SS200000135TL_D1/SS200000135TL_D1_20240612_101500_0.1.0/SS200000135TL_D1.tif"
    )
    assert (
        render_key("{kind}/{date}/{chip}/{name}", prefix="", **f)
        == "inputs/20240612/SS200000135TL_D1/SS200000135TL_D1.tif"
    )
    assert (
        render_key("{prefix}\\{chip}\\./{name}", prefix="/p/", **{**f, "name": "tiles/r0_c0.tif"})
        == "p/SS200000135TL_D1/tiles/r0_c0.tif"
    )


def test_a_key_cannot_climb_out_of_its_prefix():
    with pytest.raises(ValueError, match=r"'\.\.'"):
        render_key("{prefix}/{name}", prefix="p", name="../../etc/passwd")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30), st.text(max_size=30))
def test_rendered_keys_never_have_empty_dot_or_dotdot_parts(prefix, name):
    try:
        key = render_key("{prefix}/{name}", prefix=prefix, name=name)
    except ValueError:
        return
    assert all(part not in ("", ".", "..") for part in key.split("/"))
    assert "\\" not in key


def test_run_id_is_the_archive_stem_or_chip_and_result_time():
    assert run_id("C02533C", "/out/C02533C_20240612_101500_0.1.0.tar.gz", 0.0) == (
        "C02533C_20240612_101500_0.1.0",
        "20240612",
    )
    assert run_id("C02533C", None, at(23, 5, tz=CST), CST) == ("C02533C_20240612_230500", "20240612")


def test_an_overnight_window_is_open_across_midnight_in_local_time():
    w = UploadWindow.parse("20:00-06:00", CST)
    assert w is not None
    assert w.is_open(at(20, 0, tz=CST)) and w.is_open(at(23, 59, tz=CST)) and w.is_open(at(5, 59, tz=CST))
    assert not w.is_open(at(6, 0, tz=CST)) and not w.is_open(at(12, 0, tz=CST)) and not w.is_open(at(19, 59, tz=CST))
    assert w.next_open(at(12, 0, tz=CST)) == at(20, 0, tz=CST)
    assert w.next_open(at(21, 0, tz=CST)) == at(21, 0, tz=CST)  # open now
    assert w.next_close(at(21, 0, tz=CST)) == at(6, 0, day=13, tz=CST)


def test_a_daytime_window_and_one_ending_at_midnight():
    w = UploadWindow.parse("09:30-17:00", UTC)
    assert w is not None and w.is_open(at(9, 30)) and not w.is_open(at(17, 0)) and not w.is_open(at(9, 29))
    assert w.next_open(at(17, 30)) == at(9, 30, day=13)
    late = UploadWindow.parse("22:00-24:00", UTC)
    assert late is not None and late.is_open(at(23, 59)) and not late.is_open(at(0, 0, day=13))
    assert UploadWindow.parse("") is None


def test_retrying_retries_transient_errors_with_backoff_and_gives_up():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TransientUploadError("t", "connection reset")
        return "ok"

    assert retrying(flaky, attempts=5, base=0.5, cap=10, wait=waits.append, rng=random.Random(1)) == "ok"
    assert len(calls) == 3 and len(waits) == 2 and waits[1] >= 0.5  # second wait from the doubled step

    def down():
        raise TransientUploadError("t", "down")

    waits.clear()
    with pytest.raises(TransientUploadError):
        retrying(down, attempts=4, base=0.1, cap=1, wait=waits.append)
    assert len(waits) == 3


def test_retrying_never_retries_a_permanent_error():
    calls = []

    def denied():
        calls.append(1)
        raise PermanentUploadError("t", "access denied", hint="fix the keys")

    with pytest.raises(PermanentUploadError):
        retrying(denied, attempts=8, base=1, cap=1, wait=lambda s: pytest.fail("must not wait"))
    assert len(calls) == 1


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_throttle_makes_readers_wait_for_their_share_of_the_rate():
    clock = FakeClock()
    th = Throttle(1_000_000, burst_s=0.25, clock=clock)
    assert th.reserve(250_000) == 0.0  # the burst allowance
    assert th.reserve(500_000) == pytest.approx(0.5)  # in debt: wait until it is paid
    assert th.reserve(500_000) == pytest.approx(1.0)  # another thread queues behind
    clock.t += 1.5
    assert th.reserve(1) == pytest.approx(0.0, abs=1e-5)
    assert th.total == 1_250_001


def test_an_unlimited_throttle_only_measures_the_rate():
    clock = FakeClock()
    th = Throttle(0, clock=clock, window_s=10)
    for _ in range(10):
        assert th.reserve(1_000_000) == 0.0
        clock.t += 1
    assert th.rate_bps() == pytest.approx(1_000_000)  # 10 MB over the last 10 s
    clock.t += 0.5
    assert th.rate_bps() == pytest.approx(900_000)  # the first MB has left the window
