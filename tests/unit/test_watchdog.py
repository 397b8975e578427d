"""The step watchdog turns a hang into a failure naming the rank, step and phase: decided on a fake clock."""

from __future__ import annotations

import pytest

from trainers.watchdog import EXIT_HUNG, StepWatchdog


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_phase_that_outlives_the_timeout_names_the_rank_step_and_phase(clock):
    dog = StepWatchdog(30, rank=3, on_hang=lambda r: None, clock=clock)
    with dog.phase(7, "checkpoint save"):
        clock.now += 30.5
        hang = dog.overdue()
    assert hang is not None
    assert (hang["rank"], hang["last_step"], hang["phase"], hang["waited_s"]) == (3, 7, "checkpoint save", 30.5)
    assert hang["summary"] == ("rank 3 hung: checkpoint save after step 7 took more than train.step_timeout_s=30s")


def test_steps_that_keep_coming_never_trip_it_however_long_the_run(clock):
    dog = StepWatchdog(30, rank=0, on_hang=lambda r: None, clock=clock)
    for step in range(1000):
        with dog.phase(step, "train step"):
            clock.now += 29
            assert dog.overdue() is None


def test_the_time_after_a_phase_counts_on_its_own(clock):
    dog = StepWatchdog(30, rank=1, on_hang=lambda r: None, clock=clock)
    with dog.phase(4, "evaluation"):
        clock.now += 20
    clock.now += 31
    assert dog.overdue()["phase"] == "after evaluation"


def test_a_timeout_of_zero_turns_it_off(clock):
    dog = StepWatchdog(0, rank=0, on_hang=lambda r: None, clock=clock)
    clock.now += 1e9
    assert dog.overdue() is None
    assert dog.start()._thread is None


def test_firing_records_the_hang_then_exits_with_the_hung_code(clock):
    hung, exits = [], []
    dog = StepWatchdog(5, rank=2, on_hang=hung.append, exit=exits.append, clock=clock)
    with dog.phase(9, "train step"):
        clock.now += 6
        dog.fire(dog.overdue())
    assert exits == [EXIT_HUNG] and hung[0]["last_step"] == 9


def test_the_process_still_exits_when_recording_the_hang_fails(clock):
    exits = []

    def broken_store(reason):
        raise OSError("store unreachable")

    dog = StepWatchdog(5, rank=0, on_hang=broken_store, exit=exits.append, clock=clock)
    clock.now += 6
    with pytest.raises(OSError):
        dog.fire(dog.overdue())
    assert exits == [EXIT_HUNG]
