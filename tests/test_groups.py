"""Per-task groups (issue 15): per-group values and eta^2 against numpy over 2 and 3 gloo
ranks, bad ids, the early warnings (fire and stay quiet), the facade, the export and the
report's picture."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from groups_workers import BAD_RANK, BAD_STEP, GROUPS, groups_world, inputs, labels
from harness import run_world
from reference import assert_matches, reference_stats
from workers import read_jsonl, read_records

import monitor
from monitor import MonitorSession, groups, stats
from monitor.integrations import names
from monitor.pruning import MoERouterObserver, PruningObserver
from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.readback import flatten
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch
from monitor.testing.probes import HostSyncSpy, count_collectives

# -- the maths, no process group ----------------------------------------------------------


def test_grouped_rows_hold_each_groups_per_sample_means_exactly():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 5))
    x[0, 2, 1] = np.nan
    valid = rng.random((2, 7, 5)) > 0.2
    valid[1, 4] = False  # a sample with nothing valid: not counted
    ids = np.array([0, 2, 1, 3, 0, 2, 0])  # 3 groups; id 3 is the discard bucket
    rows = stats.grouped_rows(torch.tensor(x), torch.tensor(ids), 3, torch.tensor(valid))
    assert rows.shape == (2, 3, 6)
    for k in range(2):
        for g in range(3):
            members = [b for b in range(7) if ids[b] == g]
            per_sample = [x[k, b][valid[k, b] & np.isfinite(x[k, b])] for b in members]
            means = [v.mean() for v in per_sample if v.size]
            want = reference_stats([means]) if means else reference_stats([[]])
            want["nonfinite"] = int(sum((valid[k, b] & ~np.isfinite(x[k, b])).sum()
                                        for b in members))
            assert_matches(_value(rows[k, g]), want)


def _value(row) -> dict:
    return monitor.records.metrics_of(["x"], row.reshape(1, -1)).get(
        "x", {"mean": None, "std": None, "min": None, "max": None, "count": 0, "nonfinite": 0})


def _eta2_reference(samples_by_group: list[list[float]]) -> dict:
    seen = [np.asarray(s, dtype=np.float64) for s in samples_by_group if len(s)]
    allv = np.concatenate(seen) if seen else np.array([])
    out = {"groups": len(seen), "count": int(allv.size),
           "chance": (len(seen) - 1) / (allv.size - 1) if len(seen) >= 2 else None}
    if len(seen) < 2 or allv.max() == allv.min():
        return {**out, "value": None}
    between = sum(s.size * (s.mean() - allv.mean()) ** 2 for s in seen)
    return {**out, "value": between / ((allv - allv.mean()) ** 2).sum()}


def test_eta2_is_between_over_total_and_null_when_undefined():
    rng = np.random.default_rng(1)
    samples = [rng.normal(i, 1.0, 4 + i) for i in range(3)] + [[]]
    rows = torch.stack([stats.grouped_rows(torch.tensor(np.asarray(s)).reshape(1, -1, 1),
                                           torch.zeros(len(s), dtype=torch.long), 1)[0, 0]
                        if len(s) else stats.empty_rows(1)[0] for s in samples])
    got = groups.eta2_values(torch.stack([rows, rows[[0, 3, 3, 3]], rows[[1, 1, 1, 3]]]))
    want = _eta2_reference(samples)
    assert got[0]["value"] == pytest.approx(want["value"], rel=1e-12)
    assert {k: got[0][k] for k in ("groups", "count")} == {"groups": 3, "count": 15}
    assert got[0]["chance"] == pytest.approx(2 / 14)
    assert got[1]["value"] is None and got[1]["groups"] == 1  # one group with values
    constant = torch.tensor([[[1.0, 0.5, 0.0, 0.5, 0.5, 0.0], [3.0, 0.5, 0.0, 0.5, 0.5, 0.0]]])
    assert groups.eta2_values(constant)[0]["value"] is None  # nothing varies
    assert got[2]["value"] == pytest.approx(0.0, abs=1e-15)  # every group alike


def test_group_names_and_ids_are_checked_with_clear_messages(tmp_path):
    for bad, error, match in (("abc", TypeError, "must be a list of str"),
                              ([], ValueError, "at least one group"),
                              (["a", "a"], ValueError, "duplicates"),
                              (["a/b"], ValueError, "without '/'"),
                              (["ok", 3], TypeError, "must hold str")):
        with pytest.raises(error, match=match):
            CogVLAMonitoringConfig(group_names=bad)
    with pytest.raises(ValueError, match="group_eta2_threshold must be < 1"):
        CogVLAMonitoringConfig(group_eta2_threshold=1.0)
    with pytest.raises(ValueError, match="loss_spike_k must be a finite number > 0"):
        CogVLAMonitoringConfig(loss_spike_k=0)
    session = MonitorSession(tmp_path, "ids")
    moe = MoERouterObserver(session, group_names=["a", "b"])
    with pytest.raises(ValueError, match=r"group ids \[-1, 2\] are outside 0..1"):
        moe.set_groups([0, 2, -1])
    with pytest.raises(TypeError, match="integer tensor"):
        moe.set_groups(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-d"):
        moe.set_groups(torch.zeros(2, 2, dtype=torch.long))
    plain = PruningObserver(session)
    with pytest.raises(ValueError, match="needs group_names"):
        plain.set_groups([0])
    for obs in (moe, plain):
        obs.finalize()
    session.finish("completed")


# -- gloo worlds: exact per-group values and eta2, bad ids, collectives -------------------

def _sample_values(rank: int, step: int) -> list[dict]:
    """Each sample's value (and NaN elements) of the checked group metrics."""
    x = inputs(rank, step)
    out = []
    for b in range(len(labels(rank, step))):
        p, kept = x["p"][:, b], x["kept"][:, b]
        margins = [p[c][kept[c]].min() - p[c][~kept[c]].max() for c in range(2)
                   if 0 < kept[c].sum() < p.shape[1]]
        weights = np.exp(x["logits"][b]) / np.exp(x["logits"][b]).sum()
        tok = x["tokens"][b] / np.linalg.norm(x["tokens"][b], axis=1, keepdims=True)
        gram = tok @ tok.T
        values = {
            "p_keep": p.ravel(), "margin": np.asarray(margins),
            "forced_p_keep": x["forced"][:, b].ravel(),
            "gamma_norm": np.linalg.norm(x["gamma"][:, b], axis=1),
            "modulation_strength": np.sqrt((x["gamma"][:, b] ** 2).mean(1)
                                           + (x["beta"][:, b] ** 2).mean(1)),
            "siglip_weight": weights[1:], "entropy": [-(weights * np.log(weights)).sum()],
            "compression_ratio": [4.0],
            "token_cosine": [(gram.sum() - np.trace(gram)) / (3 * 2)]}
        out.append({k: (np.nanmean(v) if np.isfinite(v).any() else None,
                        int((~np.isfinite(v)).sum())) for k, v in values.items()})
    return out


PART_OF = {"p_keep": "lfp", "margin": "lfp", "forced_p_keep": "lfp", "gamma_norm": "film",
           "modulation_strength": "film", "siglip_weight": "moe", "entropy": "moe",
           "compression_ratio": "aggr", "token_cosine": "aggr"}


def _check_world(tmp_path, world_size: int) -> None:
    results = run_world(groups_world, world_size, tmp_path, run_dir=str(tmp_path / "run"))
    spans = {0: [0], 2: [1, 2], 4: [3, 4]}  # record label -> its steps (interval 2)
    for metric, part in PART_OF.items():
        detailed = metric == "token_cosine"
        path = tmp_path / "run" / f"{part}_logs" / ("grouped_detailed.jsonl" if detailed
                                                    else "grouped.jsonl")
        recs = {r["step"]: r for r in read_records(path)}
        assert sorted(recs) == [0, 2, 4]
        for label, steps in spans.items():
            by_group = [[] for _ in GROUPS]
            bad = [0] * len(GROUPS)
            for rank in range(world_size):
                for step in steps:
                    for b, (g, sample) in enumerate(zip(labels(rank, step),
                                                        _sample_values(rank, step))):
                        if (rank, step, b) == (BAD_RANK, BAD_STEP, 0):
                            continue  # labelled 7: in no group
                        value, nonfinite = sample[metric]
                        if value is not None:
                            by_group[g].append(value)
                        bad[g] += nonfinite
            rec = recs[label]
            for g, name in enumerate(GROUPS):
                want = reference_stats([by_group[g]])
                want["nonfinite"] = bad[g]
                got = rec["metrics"].get(groups.key(name, metric))
                if not by_group[g] and not bad[g]:
                    assert got is None, (metric, label, name)
                    continue
                assert_matches(got, want)
            eta2, want = rec["eta2"][metric], _eta2_reference(by_group)
            assert {k: eta2[k] for k in ("groups", "count")} == \
                {k: want[k] for k in ("groups", "count")}
            for key in ("value", "chance"):
                if want[key] is None:
                    assert eta2[key] is None, (metric, label, key)
                else:
                    assert eta2[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12)
    # the same metrics as without groups (to the last bit but for the order of a 3-rank
    # sum: gloo chunks a longer buffer differently), the same collectives at every call
    for part in ("lfp", "film", "moe", "aggr"):
        for stream in ("", "_detailed"):
            grouped = read_records(tmp_path / "run" / f"{part}_logs" / f"grouped{stream}.jsonl")
            plain = read_records(tmp_path / "run" / f"{part}_logs" / f"plain{stream}.jsonl")
            assert len(grouped) == len(plain) and not any("eta2" in r for r in plain)
            for g, p in zip(grouped, plain):
                same = {k: v for k, v in g["metrics"].items()
                        if not k.startswith("groups/") and k != groups.INVALID}
                assert same.keys() == p["metrics"].keys()
                for key, value in p["metrics"].items():
                    assert same[key].pop("nonfinite_ranks", None) == \
                        value.pop("nonfinite_ranks", None)
                    assert same[key] == pytest.approx(value, rel=1e-12), (part, key)
    for r in results:  # the last: finalize(), one flush per observer (4 here)
        assert r["collectives"]["grouped"] == r["collectives"]["plain"]
        assert max(r["collectives"]["grouped"][:-1]) <= 3
    # rank 1's id 7 of step 1: counted in record 2 on the device, an alert, then the next
    # set_groups (step 4, after the flush at step 3's call) raises on every rank, once
    for part in ("lfp", "film", "moe", "aggr"):
        lines = read_jsonl(tmp_path / "run" / f"{part}_logs" / "grouped.jsonl")
        rec = next(r for r in lines if r.get("step") == 2 and "metrics" in r)
        assert {k: rec["metrics"][groups.INVALID][k] for k in ("count", "min", "max",
                                                               "min_rank")} == \
            {"count": 1, "min": 7.0, "max": 7.0, "min_rank": BAD_RANK}
        (alert,) = [r["alert"] for r in lines if "alert" in r
                    and r["alert"]["type"] == "invalid_group_ids"]
        assert alert["count"] == 1 and alert["max_rank"] == BAD_RANK
    for r in results:
        assert [(step, part) for step, part, _ in r["raised"]] == \
            [(4, p) for p in ("lfp", "film", "moe", "aggr")]
        assert "1 group id(s) outside 0..2 (on rank 1): ids 7" in r["raised"][0][2]


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_per_group_values_and_eta2_are_exact_over_gloo_ranks(tmp_path, world_size):
    _check_world(tmp_path, world_size)


# -- early warnings: each fires, and stays quiet --------------------------------------------

def test_loss_spike_fires_on_a_spike_after_the_warmup_and_stays_quiet_otherwise(tmp_path):
    rng = np.random.default_rng(2)
    runs = {}
    for name, spike, kwargs in (("spike", 20.0, {}), ("quiet", 1.0, {}),
                                ("off", 20.0, {"spike_metric": None})):
        mon = monitor.Monitor(run_dir=tmp_path / name, run_id=name, log_interval=1,
                              console=False, spike_warmup=4, spike_window=8, **kwargs)
        for step in range(12):
            loss = rng.normal(2.0, 0.05, 4)
            if step == 9:
                loss[1] = spike
            with mon.step(step) as h:
                h.log(loss=torch.tensor(loss))
        mon.finalize()
        runs[name] = [a["alert"] for a in mon.alerts]
    (alert,) = runs["spike"]
    assert alert["type"] == "loss_spike" and alert["metric"] == "loss"
    assert alert["max"] == 20.0 and alert["window_records"] == 8 and alert["k"] == 6.0
    assert alert["threshold"] == pytest.approx(alert["window_mean"] + 6 * alert["window_std"])
    assert runs["quiet"] == [] and runs["off"] == []


def _routing_run(tmp_path, name, spread: float, by_group: bool, **kwargs):
    """LFP and MoE observers fed 7 records of 16 samples in 2 groups: p_keep values
    ``spread`` apart (the top-k margin), and p_keep and MoE weights that vary from sample to
    sample either alike in both groups (eta2 0) or mostly between them (eta2 near 1)."""
    session = MonitorSession(tmp_path / name, name)
    kw = {"event_interval": 1, "group_names": ["a", "b"]}
    lfp = PruningObserver(session, ["layer_00", "layer_01"], margin_warmup=2,
                          margin_patience=3, eta2_patience=3, **kw, **kwargs)
    moe = MoERouterObserver(session, eta2_patience=3, **kw, **kwargs)
    ids = torch.tensor([0, 1] * 8)
    within = (torch.arange(16, dtype=torch.float64) // 2).unsqueeze(1)  # the same in a and b
    shift = 3.0 * ids.unsqueeze(1) if by_group else 0.0
    for step in range(7):
        for obs in (lfp, moe):
            obs.set_groups(ids)
        p = 0.5 + spread * torch.arange(8, dtype=torch.float64).repeat(16, 1) \
            + 1e-4 * (within + step) + 0.01 * shift
        for c in lfp.components:
            lfp.observe(c, p, p >= p[:, 4:5])
        moe.observe_logits(torch.cat([0.1 * within + shift, -0.1 * within], dim=1))
        for obs in (lfp, moe):
            obs.log_step(step)
    for obs in (lfp, moe):
        obs.finalize()
    session.finish("completed")
    return {part: [a["alert"] for a in obs.alerts] for part, obs in (("lfp", lfp), ("moe", moe))}


def test_undecided_router_and_task_blind_routing_fire_and_stay_quiet(tmp_path):
    blind = _routing_run(tmp_path, "blind", spread=1e-5, by_group=False)
    kinds = [(a["type"], a.get("metric")) for a in blind["lfp"] + blind["moe"]]
    assert sorted(kinds) == [("routing_ignores_instruction", "dino_weight"),
                             ("routing_ignores_instruction", "p_keep"),
                             ("routing_ignores_instruction", "siglip_weight"),
                             ("undecided_router", None)]
    undecided = next(a for a in blind["lfp"] if a["type"] == "undecided_router")
    assert undecided["layers"] == 2 and undecided["widest_margin"] < 1e-3
    assert undecided["consecutive_records"] == 3
    ignores = next(a for a in blind["moe"] if a["metric"] == "siglip_weight")
    assert ignores["eta2"] < ignores["chance"] + 0.01 and ignores["count"] == 16
    decided = _routing_run(tmp_path, "decided", spread=0.05, by_group=True)
    assert decided == {"lfp": [], "moe": []}
    off = _routing_run(tmp_path, "off", spread=1e-5, by_group=False, eta2_threshold=None)
    assert [a["type"] for a in off["lfp"]] == ["undecided_router"] and off["moe"] == []


# -- the facade on the stand-in: records, no host sync, export, read-back, report ---------

@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):
    """The stand-in with every part on and 40 groups, each sample's task drawn per step."""
    tmp_path = tmp_path_factory.mktemp("groups")
    # shallow (4 LFP layers, FiLM blocks 0 and 9 of 10 and 11): the wiring is the same
    model_cfg = TinyCogVLAConfig(image_size=8, num_hidden_layers=12, dino_depth=10,
                                 siglip_depth=11)
    model = build_tiny_cogvla(model_cfg, seed=0)
    task_names = [f"task {i:02d}: put the object number {i} in the basket" for i in range(40)]
    mon = CogVLAMonitoring(run_dir=tmp_path / "r", run_id="r", cfg=CogVLAMonitoringConfig(
        monitor_log_interval=2, pruning_event_log_interval=2, detailed_log_interval=2,
        film_sample_layers=[0, 9], console=False, group_names=task_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon.attach(model)
    gen = torch.Generator().manual_seed(0)
    drawn, syncs = [], []
    counter = count_collectives()
    for step in range(4):
        tasks = torch.randint(0, 40, (3,), generator=gen)
        drawn.append(tasks.tolist())
        batch = synthetic_batch(model_cfg, batch_size=3, generator=gen, tasks=tasks)
        with HostSyncSpy(only_from="monitor") as spy:
            mon.set_groups(tasks)
            out = model(**batch)
        syncs += spy.calls
        out.loss.backward()
        mon.log_step(step)
        with mon.step(step) as h:
            h.log(loss=out.loss.detach())
    with pytest.raises(ValueError, match=r"group ids \[40\] are outside 0..39"):
        mon.set_groups([0, 40, 1])
    mon.finalize()
    counter["restore"]()
    return tmp_path / "r", drawn, syncs


def test_the_facade_groups_every_part_without_a_host_sync(grouped_run):
    run_dir, drawn, syncs = grouped_run
    assert syncs == []  # set_groups and every hook, deferred work included
    run = monitor.read_run(run_dir)
    first = {part: run[part].records[1] for part in ("lfp", "film", "moe", "aggr")}
    tasks = [t for step in drawn[1:3] for t in step]  # record 2: steps 1..2
    counts = {t: tasks.count(t) for t in tasks}
    for t, n in counts.items():
        name = f"task {t:02d}: put the object number {t} in the basket"
        assert first["lfp"]["metrics"][groups.key(name, "p_keep")]["count"] == n
        # two images per sample: FiLM and MoE see each sample twice, aggregation 4 times
        assert first["moe"]["metrics"][groups.key(name, "siglip_weight")]["count"] == 2 * n
        assert first["film"]["metrics"][groups.key(name, "gamma_norm")]["count"] == 2 * n
        assert first["aggr"]["metrics"][groups.key(name, "compression_ratio")]["count"] == 4 * n
    assert set(first["moe"]["eta2"]) == {"dino_weight", "siglip_weight", "entropy"}
    assert first["lfp"]["eta2"]["p_keep"]["count"] == len(tasks)
    assert first["aggr"]["eta2"]["compression_ratio"]["value"] is None  # constant
    summary = run["moe"].summary["eta2"]["events"]["siglip_weight"]
    values = [v for v in run["moe"].eta2("siglip_weight")[1] if v is not None]
    assert summary["last"] == values[-1] and summary["min"] == min(values)
    assert summary["records"] == len(run["moe"].records)
    assert len(run["lfp"].group_names()) == len(set(t for s in drawn for t in s))


def test_the_compact_export_adds_one_key_per_eta2_metric_whatever_the_groups(grouped_run):
    run_dir, _, _ = grouped_run
    run = monitor.read_run(run_dir)
    keys, eta2_keys = set(), set()
    for part in run.parts:
        for rec in run[part].records + run[part].detailed:
            for name, _ in names.scalars(part, rec.get("mode", "events"), rec):
                keys.add(name)
                assert "/groups/" not in name
                if "/eta2/" in name:
                    eta2_keys.add(name)
    # one key per group metric whose eta2 was ever defined (never one per group): of the 17
    # group metrics, the LFP token counts and the aggregation's constants never vary
    # (and three of those are functions of other exported ones: names.ETA2_DERIVED)
    defined = {f"monitor/{part}/eta2/{m}/value" for part in run.parts
               for rec in run[part].records + run[part].detailed
               for m, v in (rec.get("eta2") or {}).items() if v["value"] is not None}
    assert eta2_keys == {k for k in defined if k.split("/")[3] not in names.ETA2_DERIVED}
    assert len(defined) == 11 and len(eta2_keys) == 8
    assert "monitor/moe/eta2/siglip_weight/value" in eta2_keys
    every = {n for part in run.parts for rec in run[part].records + run[part].detailed
             for n, _ in names.scalars(part, rec.get("mode", "events"), rec, export_all=True)}
    assert {n for n in every if "/groups/" in n} and eta2_keys <= every


def test_read_run_and_the_report_show_eta2_and_draw_groups_png(grouped_run, capsys,
                                                               monkeypatch):
    pytest.importorskip("matplotlib")
    run_dir, _, _ = grouped_run
    row = flatten(monitor.read_run(run_dir)["moe"].records[-1])  # a to_pandas() row
    assert {"eta2/siglip_weight.value", "eta2/siglip_weight.chance",
            "eta2/siglip_weight.groups", "eta2/siglip_weight.count"} <= set(row)
    assert "eta2" not in row
    from monitor import plots
    from monitor.__main__ import main

    monkeypatch.setattr(plots, "PART_PLOTS", {})  # the other pictures: tests/test_report.py
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "eta2/siglip_weight" in out and "per-group metrics of" in out
    assert "groups/" not in out
    png = run_dir / "report" / "groups.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    width, height = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
    assert width > 1200 and height > 1000  # 40 rows of labels


def test_groups_off_is_the_default_and_set_groups_then_says_so(tmp_path):
    assert CogVLAMonitoringConfig().group_names is None
    mon = CogVLAMonitoring(run_dir=tmp_path / "r", run_id="r",
                           cfg=CogVLAMonitoringConfig(console=False))
    with pytest.raises(ValueError, match=r"needs CogVLAMonitoringConfig\(group_names"):
        mon.set_groups([0])
    for obs in mon.observers.values():
        assert not [n for n in obs.events.slots.names + obs.detailed.slots.names
                    if n.startswith("groups/") or n == groups.INVALID]
    mon.finalize()
