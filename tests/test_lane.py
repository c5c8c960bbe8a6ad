"""The tracking thread (``tracking.Lane``): order, pause, errors, and waiting at the end."""

from __future__ import annotations

import threading
import time

import pytest

from mycelium.tracking.lane import Lane
from mycelium.tracking.runs import TrackingError


def test_jobs_run_in_order_on_one_background_thread():
    seen: list[tuple[int, str]] = []
    with Lane() as lane:
        futures = [lane.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i) for i in range(20)]
        lane.drain()
    assert [i for i, _ in seen] == list(range(20))
    assert {name for _, name in seen} != {threading.main_thread().name}
    assert len({name for _, name in seen}) == 1
    assert [f.result() for f in futures] == list(range(20))


def test_paused_lane_starts_no_job_until_the_pause_ends():
    started = threading.Event()
    lane = Lane(paused=True)
    lane.submit(started.set)
    assert not started.wait(0.3)  # created paused: waits for the first pause to end
    with lane.paused():
        assert not started.wait(0.3)
    assert started.wait(5)
    with lane.paused():
        second = threading.Event()
        lane.submit(second.set)
        assert not second.wait(0.3)
    assert second.wait(5)
    lane.close()


def test_drain_opens_a_paused_lane_and_raises_the_first_error():
    done: list[int] = []
    lane = Lane(paused=True)
    lane.submit(lambda: done.append(1))
    lane.submit(lambda: (_ for _ in ()).throw(RuntimeError("upload failed: epoch 2")))
    third = lane.submit(lambda: done.append(3))  # not run: nothing is published after a failure
    with pytest.raises(RuntimeError, match="epoch 2"):
        lane.drain()
    assert done == [1]
    with pytest.raises(TrackingError, match=r"not run: an earlier tracking step failed \(upload failed: epoch 2\)"):
        third.result()
    with pytest.raises(RuntimeError, match="epoch 2"):
        lane.check()
    lane.drain(raise_errors=False)  # logs instead
    lane.close()


def test_check_does_not_wait_and_close_waits_for_running_jobs():
    release = threading.Event()
    finished: list[bool] = []
    lane = Lane()
    lane.submit(lambda: (release.wait(5), finished.append(True)))
    t = time.perf_counter()
    lane.check()  # nothing failed yet; returns at once
    assert time.perf_counter() - t < 0.5
    threading.Timer(0.2, release.set).start()
    lane.close()
    assert finished == [True]


def test_a_failed_job_is_reported_as_explain_words_it_and_later_jobs_do_not_run():
    ran = []

    def explain(error):
        return RuntimeError(f"explained: {error}")

    with Lane(explain=explain) as lane:
        lane.submit(lambda: (_ for _ in ()).throw(ConnectionError("store down")))
        later = lane.submit(ran.append, 1)
        with pytest.raises(RuntimeError, match="explained: store down"):
            lane.drain()
    assert ran == [] and "an earlier tracking step failed (explained: store down)" in str(later.exception())
