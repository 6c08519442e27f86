"""Real gloo worlds: reductions, unions, mismatches, participation, who writes."""

from __future__ import annotations

import numpy as np
import pytest
import workers
from harness import run_world
from reference import assert_matches, bucket_of, due_labels, reference_stats
from tree import tree

pytestmark = pytest.mark.distributed


def make_plan(world_size: int, steps: list[int], seed: int) -> list[list]:
    """Uneven numbers of values per rank and step, NaN/Inf mixed in."""
    rng = np.random.default_rng(seed)
    plan = []
    for rank in range(world_size):
        items = []
        for step in steps:
            loss = rng.normal(2.0 + rank, 0.5, size=rank + 1 + step % 3)
            if (rank + step) % 7 == 3:
                loss[0] = np.nan
            if (rank + step) % 11 == 5:
                loss[-1] = -np.inf
            values = {"loss": loss, "lr": 1e-4 * (1 + step), "grad": rng.gamma(2.0, size=4)}
            items.append((step, "train", values))
        plan.append(items)
    return plan


def expected_records(plan, labels):
    want: dict[int, dict[str, list]] = {}
    for items in plan:
        for step, _, values in items:
            bucket = want.setdefault(bucket_of(step, labels), {})
            for name, value in values.items():
                bucket.setdefault(name, []).append(value)
    return {label: {n: reference_stats(v) for n, v in m.items()} for label, m in want.items()}


@pytest.mark.parametrize("world_size", [2, 3])
def test_flush_matches_numpy_over_all_ranks_values(tmp_path, world_size):
    steps = list(range(0, 23))
    plan = make_plan(world_size, steps, seed=world_size)
    kinds = {"loss": "tensor", "lr": "float", "grad": "float32"}
    run_dir = tmp_path / "run"
    out = run_world(workers.log_plan, world_size, tmp_path, run_dir=str(run_dir),
                    run_id="r", plan=plan, interval=5, kinds=kinds)
    labels = due_labels(steps, 5)
    want = expected_records(plan, labels)
    got = tree(run_dir, "r").metric_records()
    assert [r["step"] for r in got] == labels
    for rec in got:
        assert list(rec) == ["step", "mode", "time", "world_size", "metrics"]
        assert rec["mode"] == "train" and rec["world_size"] == world_size
        assert set(rec["metrics"]) == {"loss", "lr", "grad"}
        for name, value in rec["metrics"].items():
            rel = 1e-6 if name == "grad" else 1e-9  # grad went through float32
            assert_matches(value, want[rec["step"]][name], rel=rel)
    meta = tree(run_dir, "r").meta()
    assert meta["participation"]["decision"] == "all_ranks"
    assert meta["participation"]["contributing_ranks"] == list(range(world_size))
    assert meta["world_size"] == world_size and meta["backend"] == "gloo"
    for rank_out in out:
        # 3 collectives at the first flush (header first), then 2 (the header rides on the
        # MAX buffer once the first flush has fixed its capacity)
        flushes = [d for d in rank_out["deltas"] if d]
        assert flushes[0] == 3 and set(flushes[1:]) == {2}


def test_ranks_with_different_metric_sets_reduce_the_union(tmp_path):
    steps = [0, 1, 2, 3]
    plan = []
    for rank in range(3):
        items = []
        for step in steps:
            values = {"loss": [float(rank + step)]}
            if rank == 1:
                values["only_on_1"] = [10.0 + step, 20.0]
            if rank == 2 and step >= 2:
                values["late_on_2"] = [float(step)]
            items.append((step, "train", values))
        plan.append(items)
    run_dir = tmp_path / "run"
    out = run_world(workers.log_plan, 3, tmp_path, run_dir=str(run_dir), run_id="u",
                    plan=plan, interval=2)
    labels = due_labels(steps, 2)
    want = expected_records(plan, labels)
    got = tree(run_dir, "u").records()
    assert [r["step"] for r in got] == labels
    for rec in got:
        assert set(rec["metrics"]) == set(want[rec["step"]])
        for name, value in rec["metrics"].items():
            assert_matches(value, want[rec["step"]][name])
    union = ["all_reduce", "all_gather", "all_gather"]
    for rank_out in out:
        # steps 0 and 2 bring new names (union path: the header, then 2 gathers), finalize
        # at 3 finds them adopted (the fused MAX buffer and the SUM)
        assert rank_out["calls"] == union + union + ["all_reduce"] * 2


@pytest.mark.parametrize("interval, where, steps", [(10, "context", "10..20"),
                                                     (1000, "finalize", "11..21")])
def test_out_of_step_ranks_raise_on_every_rank(tmp_path, interval, where, steps):
    messages = run_world(workers.out_of_step, 2, tmp_path, run_dir=str(tmp_path / "run"),
                         interval=interval)
    for msg in messages:
        assert msg is not None and msg.startswith(where)
        assert "same step numbers" in msg and steps in msg
    logs = tree(tmp_path / "run", "oos")
    assert not logs.path().read_text()
    if where == "finalize":
        summary = logs.summary()
        assert (summary["status"], summary["error"]) == ("failed", "RankMismatchError")


@pytest.mark.parametrize("num_metrics", [5, 1000, 10_000])
def test_collectives_per_flush_do_not_depend_on_metric_count(tmp_path, num_metrics):
    per_rank = run_world(workers.many_metrics, 2, tmp_path, run_dir=str(tmp_path / "run"),
                         num_metrics=num_metrics, steps=7, interval=3)
    for per_step in per_rank:
        # step 0's record waits for step 1's call (step 0 might have had more contexts),
        # then each due step's is written at its context's exit
        assert per_step == [0, 3, 0, 2, 0, 0, 2]


def test_rows_outgrowing_the_fused_capacity_fall_back_to_three_collectives(tmp_path):
    """The first flush fixes the capacity of the fused MAX buffer (3 metrics: 4 rows);
    9 metrics later do not fit: that flush takes the header-known path (3 collectives)
    and grows the capacity (16), after which 2 suffice again. With an interval of 1,
    each record is written at the next step's first call (at most one flush per step)
    and the last at finalize."""
    counts = [3, 3, 9, 9, 2]
    out = run_world(workers.growing_metrics, 2, tmp_path, run_dir=str(tmp_path / "run"),
                    counts=counts)
    for per_step in out:
        assert per_step == [0, 3, 2, 3, 2, 2]
    recs = tree(tmp_path / "run", "grow").records()
    assert [len(r["metrics"]) for r in recs] == counts
    for step, rec in enumerate(recs):
        for i in range(counts[step]):
            values = [rank * 100 + i + step for rank in range(2)]
            assert rec["metrics"][f"m{i}"]["mean"] == sum(values) / 2
            assert rec["metrics"][f"m{i}"]["min"] == min(values)
            assert rec["metrics"][f"m{i}"]["max"] == max(values)
            assert rec["metrics"][f"m{i}"]["count"] == 2


def test_rank0_only_monitor_finishes_and_writes_local_statistics(tmp_path):
    run_dir = tmp_path / "run"
    out = run_world(workers.rank0_only, 2, tmp_path, run_dir=str(run_dir), wait=1.0)
    got = tree(run_dir, "r0").records()
    assert [r["step"] for r in got] == [0, 2, 4]
    assert got[1]["metrics"]["loss"]["count"] == 6  # rank 0's own values, steps 1-2
    meta = tree(run_dir, "r0").meta()
    assert meta["participation"]["decision"] == "rank0_only"
    assert meta["participation"]["statistics"] == "local"
    assert out[1] is None


def test_torchrun_env_without_process_group_writes_from_rank0_only(tmp_path):
    pattern = str(tmp_path / "run-{rank}")
    out = run_world(workers.no_process_group, 2, tmp_path, init=False,
                    env={"RANK": "{rank}", "WORLD_SIZE": "2"}, run_dir_pattern=pattern)
    assert out[0]["exists"] and not out[1]["exists"]
    assert all(any("no process group" in w for w in o["warnings"]) for o in out)
    rec = tree(tmp_path / "run-0", "nopg").records()
    assert rec[0]["metrics"]["loss"]["mean"] == 0.0


def test_only_rank0_touches_the_filesystem(tmp_path):
    plan = [[(0, "train", {"loss": [1.0]})], [(0, "train", {"loss": [2.0]})]]
    out = run_world(workers.log_plan_per_rank_dir, 2, tmp_path,
                    pattern=str(tmp_path / "run-{rank}"), plan=plan)
    assert out == [True, False]


def test_same_names_logged_in_different_orders_take_the_fast_path(tmp_path):
    plan = [
        [(0, "train", {"a": [1.0], "b": [2.0]})],
        [(0, "train", {"b": [3.0], "a": [4.0]})],
    ]
    out = run_world(workers.log_plan, 2, tmp_path, run_dir=str(tmp_path / "run"),
                    run_id="o", plan=plan, interval=1)
    assert out[0]["calls"] == ["all_reduce"] * 3
    rec = tree(tmp_path / "run", "o").records()[0]
    assert rec["metrics"]["a"]["mean"] == 2.5 and rec["metrics"]["b"]["mean"] == 2.5


def test_participation_local_never_communicates(tmp_path):
    plan = [[(0, "train", {"loss": [1.0]})], [(0, "train", {"loss": [5.0]})]]
    out = run_world(workers.log_plan, 2, tmp_path, run_dir=str(tmp_path / "run"),
                    run_id="l", plan=plan, interval=1, participation="local")
    assert out[0]["calls"] == out[1]["calls"] == []
    rec = tree(tmp_path / "run", "l").records()[0]
    assert rec["metrics"]["loss"]["mean"] == 1.0


def test_a_rank_that_builds_its_monitor_too_late_is_told_and_never_hangs(tmp_path):
    out = run_world(workers.late_rank1, 2, tmp_path, run_dir=str(tmp_path / "run"))
    assert any("not reduced" in w for w in out[1])
    meta = tree(tmp_path / "run", "late").meta()
    assert meta["participation"]["decision"] == "rank0_only"


def test_world_of_three_equals_one_process_over_the_concatenated_inputs(tmp_path):
    steps = list(range(1, 13))
    plan = make_plan(3, steps, seed=7)
    run_world(workers.log_plan, 3, tmp_path, run_dir=str(tmp_path / "world"), run_id="c",
              plan=plan, interval=4)
    single = [[(step, "train", {k: np.concatenate([np.atleast_1d(plan[r][i][2][k])
                                                   for r in range(3)])
                                for k in plan[0][i][2]})
               for i, step in enumerate(steps)]]
    workers.log_plan(0, 1, str(tmp_path / "one"), "c", single, interval=4)
    world = tree(tmp_path / "world", "c").metric_records()
    one = tree(tmp_path / "one", "c").metric_records()
    assert [r["step"] for r in world] == [r["step"] for r in one] == [4, 8, 12]
    for w, o in zip(world, one):
        assert w["metrics"].keys() == o["metrics"].keys()
        for name in w["metrics"]:
            assert_matches(w["metrics"][name], o["metrics"][name], rel=1e-12)


def test_contexts_without_values_and_a_silent_rank_neither_hang_nor_write_noise(tmp_path):
    plan = [
        [(0, "train", {}), (1, "train", {}), (2, "train", {"loss": [1.0]})],
        [(0, "train", {}), (1, "train", {}), (2, "train", {})],
    ]
    out = run_world(workers.log_plan, 2, tmp_path, run_dir=str(tmp_path / "run"),
                    run_id="e", plan=plan, interval=1)
    recs = tree(tmp_path / "run", "e").records()
    assert [(r["step"], r["metrics"]["loss"]["count"]) for r in recs] == [(2, 1)]
    assert out[0]["calls"] == out[1]["calls"]


def test_eval_records_reduce_every_rank_at_every_exit(tmp_path):
    plan = []
    for rank in range(2):
        items = []
        for step in range(1, 7):
            items.append((step, "train", {"loss": [float(rank + step)]}))
            if step % 3 == 0:
                items.append((step, "eval", {"loss": np.arange(rank + 2, dtype=float)}))
        plan.append(items)
    run_world(workers.log_plan, 2, tmp_path, run_dir=str(tmp_path / "run"), run_id="ev",
              plan=plan, interval=3)
    recs = tree(tmp_path / "run", "ev").records()
    assert [(r["step"], r["mode"]) for r in recs] == [
        (3, "train"), (3, "eval"), (6, "train"), (6, "eval")]
    assert_matches(recs[1]["metrics"]["loss"], reference_stats([[0, 1], [0, 1, 2]]))
    assert_matches(recs[2]["metrics"]["loss"], reference_stats([[4, 5, 6], [5, 6, 7]]))


def test_a_rank0_only_eval_monitor_beside_a_global_one(tmp_path):
    run_world(workers.rank0_eval_beside_global_train, 2, tmp_path, run_dir=str(tmp_path / "r"))
    train = tree(tmp_path / "r", "tr").records()
    assert [(r["step"], r["metrics"]["loss"]["count"]) for r in train] == [(2, 4), (4, 4)]
    evals = tree(tmp_path / "r", "tr-eval").records()
    assert [(r["step"], r["mode"]) for r in evals] == [(2, "eval"), (4, "eval")]
    assert tree(tmp_path / "r", "tr").meta()["participation"]["decision"] \
        == "all_ranks"
