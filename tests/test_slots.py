"""Slots: value types, declared names, batching, reset without reallocation."""

import numpy as np
import pytest
import torch
from reference import assert_matches, reference_stats, value_stats

from monitor.slots import StatSlots, as_samples


@pytest.mark.parametrize(
    "value",
    [1, 2.5, True, np.float32(1.5), np.int64(3), np.array(2.0), torch.tensor(1.0),
     torch.tensor([1.0, 2.0], dtype=torch.bfloat16), np.arange(4), torch.tensor([1, 2])],
)
def test_as_samples_accepts_real_numbers_arrays_and_tensors(value):
    assert as_samples("x", value) is not None


@pytest.mark.parametrize("value", [1j, np.complex64(1), torch.tensor([1j]), "1.0", [1.0],
                                   np.array(["a"]), object()])
def test_as_samples_rejects_non_real_values_naming_the_metric(value):
    with pytest.raises(TypeError, match="'x'"):
        as_samples("x", value)


def test_as_samples_skips_none_and_empty():
    assert as_samples("x", None) is None
    assert as_samples("x", torch.empty(0)) is None
    assert as_samples("x", np.empty(0)) is None


def test_updating_an_undeclared_name_raises():
    slots = StatSlots(["a"])
    with pytest.raises(KeyError, match="not declared"):
        slots.update({"b": 1.0})


def test_mixed_host_and_tensor_values_fold_into_one_row_each():
    slots = StatSlots(["a", "b", "c"])
    seen = {"a": [], "b": [], "c": []}
    for i in range(5):
        vals = {"a": float(i), "b": torch.tensor(i * 2.0), "c": torch.arange(3.0) + i}
        slots.update({k: as_samples(k, v) for k, v in vals.items()})
        # logging in another order exercises the non-contiguous index path
        slots.update({"c": as_samples("c", 7.0), "a": as_samples("a", torch.tensor(-1.0))})
        for k, v in vals.items():
            seen[k].append(np.asarray(v, dtype=np.float64))
        seen["c"].append(np.array([7.0]))
        seen["a"].append(np.array([-1.0]))
    rows = slots.local_rows(["c", "zz", "a", "b"], torch.device("cpu")).tolist()
    assert_matches(value_stats(rows[0]), reference_stats(seen["c"]))
    assert value_stats(rows[1])["count"] == 0
    assert_matches(value_stats(rows[2]), reference_stats(seen["a"]))
    assert_matches(value_stats(rows[3]), reference_stats(seen["b"]))


def test_reset_empties_rows_without_reallocating():
    slots = StatSlots(["a"])
    slots.update({"a": torch.tensor(1.0)})
    (acc,) = slots._acc.values()
    ptr = acc.data_ptr()
    for _ in range(100):
        slots.update({"a": torch.tensor(2.0)})
        slots.reset()
    assert slots._acc[torch.device("cpu")].data_ptr() == ptr
    assert value_stats(slots.local_rows(["a"], torch.device("cpu"))[0].tolist())["count"] == 0


def test_update_folds_every_element_of_a_tensor_and_skips_empty_tensors():
    slots = StatSlots(["g"])
    x = torch.randn(4, 5, dtype=torch.bfloat16)
    for value in (x, torch.empty(0), torch.tensor([float("inf")])):
        sample = as_samples("g", value)
        if sample is not None:
            slots.update({"g": sample})
    got = value_stats(slots.local_rows(["g"], torch.device("cpu"))[0].tolist())
    assert_matches(got, reference_stats([x.double().numpy(), [np.inf]]))
    with pytest.raises(KeyError, match="not declared"):
        slots.update({"h": x})
