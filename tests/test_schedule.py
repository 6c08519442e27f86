import numpy as np
import pytest
import torch

from monitor.schedule import IntervalSchedule, check_interval, check_step


def due(steps, interval):
    s = IntervalSchedule(interval)
    return [t for t in steps if s.reaches_new_multiple(t)]


def test_steps_from_zero_are_due_at_each_multiple_including_zero():
    assert due(range(0, 301), 100) == [0, 100, 200, 300]


def test_steps_from_one_are_due_at_the_multiples():
    assert due(range(1, 31), 10) == [10, 20, 30]


def test_a_skipped_multiple_makes_the_next_step_due():
    assert due([0, 30, 60, 90, 120, 150, 180, 210], 100) == [0, 120, 210]


def test_repeated_steps_are_due_once():
    assert due([9, 9, 10, 10, 10, 11], 10) == [10]


def test_a_resumed_run_starts_counting_where_it_resumes():
    assert due(range(5001, 5301), 100) == [5100, 5200, 5300]


@pytest.mark.parametrize("bad", [0, -5])
def test_interval_must_be_positive(bad):
    with pytest.raises(ValueError, match="log_interval must be > 0"):
        check_interval("log_interval", bad)


@pytest.mark.parametrize("bad", [1.0, "1", True])
def test_interval_must_be_an_int(bad):
    with pytest.raises(TypeError, match="log_interval"):
        check_interval("log_interval", bad)


def test_step_accepts_numpy_ints_and_refuses_tensors_and_negatives():
    assert check_step(np.int64(7)) == 7
    assert check_interval("log_interval", np.int64(5)) == 5
    with pytest.raises(TypeError, match="Python int"):
        check_step(torch.tensor(3))
    with pytest.raises(ValueError, match=">= 0"):
        check_step(-1)
    with pytest.raises(TypeError):
        check_step(2.0)
