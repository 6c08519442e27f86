"""Statistic rows against float64 numpy references (no process group)."""

import math

import numpy as np
import pytest
import torch
from reference import assert_matches, reference_stats, value_stats

from monitor import stats


def as_dict(row: torch.Tensor) -> dict:
    return value_stats(row.reshape(-1).tolist())


def test_row_of_samples_matches_numpy_with_nonfinite_values():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=1000)
    x[[3, 50, 700]] = [np.nan, np.inf, -np.inf]
    assert_matches(as_dict(stats.row_of_samples(torch.from_numpy(x))), reference_stats([x]))


def test_combining_pieces_equals_the_concatenation():
    rng = np.random.default_rng(1)
    pieces = [rng.normal(1e6, 1e-2, size=n) for n in (1, 7, 100, 3)]
    acc = stats.empty_rows(1)
    for p in pieces:
        acc = stats.combine(acc, stats.row_of_samples(torch.from_numpy(p)))
    assert_matches(as_dict(acc), reference_stats(pieces), rel=1e-7)


def test_bf16_values_are_accumulated_in_float64():
    x = torch.randn(64, 33, dtype=torch.bfloat16)
    got = as_dict(stats.row_of_samples(x))
    assert_matches(got, reference_stats([x.to(torch.float64).numpy()]))


def test_rows_of_scalars_count_each_element_once():
    v = torch.tensor([1.0, float("nan"), 3.0])
    rows = stats.rows_of_scalars(v)
    assert rows[:, stats.COUNT].tolist() == [1.0, 0.0, 1.0]
    assert rows[:, stats.NONFINITE].tolist() == [0.0, 1.0, 0.0]
    assert rows[1, stats.MIN] == math.inf and rows[1, stats.MAX] == -math.inf


def test_shifted_sums_round_trip_and_constant_data_has_zero_std():
    const = stats.row_of_samples(torch.full((10,), 1e-4, dtype=torch.float64))
    varied = stats.row_of_samples(torch.arange(5, dtype=torch.float64))
    rows = torch.cat([const, varied])
    shift = stats.midrange_shift(rows[:, stats.MIN], rows[:, stats.MAX])
    back = stats.rows_from_sums(stats.shifted_sums(rows, shift), shift,
                                rows[:, stats.MIN], rows[:, stats.MAX])
    assert as_dict(back[0])["std"] == 0.0
    assert as_dict(back[0])["mean"] == pytest.approx(1e-4, rel=1e-15)
    assert_matches(as_dict(back[1]), reference_stats([np.arange(5.0)]))


def test_empty_rows_write_null_moments():
    got = as_dict(stats.empty_rows(1))
    assert got == {"mean": None, "std": None, "min": None, "max": None, "count": 0,
                   "nonfinite": 0}
