"""Beside the public CogVLA script: its own W&B keys and the monitor's share one run.

The loop below makes the script's calls in its order (``../shared/COGVLA.md``), with its
hand-written ``wandb.log`` calls, W&B offline; the run is read back from its file.
"""

from __future__ import annotations

import pytest
import torch
from tree import tensorboard_dir, tree
from wandb_helpers import wandb_history, wandb_offline

from monitor.integrations import names
from monitor.layout import TRAIN
from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch

MODEL_CFG = TinyCogVLAConfig(image_size=16)
STEPS, ACCUMULATION = 4, 2
W_INTERNAL = {"_step", "_runtime", "_timestamp"}


def fork_run(tmp_path, **cfg):
    """vla-scripts/finetune.py's loop: wandb.init on rank 0, the monitor (enable_wandb at
    its default) logging into that run, the script logging its own keys by hand, every
    interval at 1 or 2 so that records and the script's logs meet at the same steps.
    Returns (run dir, run file, {(step, key): value} the script logged)."""
    import wandb

    model = build_tiny_cogvla(MODEL_CFG, seed=0)
    run = wandb.init(project="cogvla", dir=str(tmp_path))
    mon = CogVLAMonitoring(run_dir=tmp_path / "r", run_id="r", config_name="libero",
                           cfg=CogVLAMonitoringConfig(
                               monitor_log_interval=1, detailed_log_interval=2,
                               pruning_event_log_interval=1, film_sample_layers=[0, 9, 18, 26],
                               console=False, **cfg))
    mon.attach(model)
    observers = [mon.lfp_observer, mon.film_observer, mon.moe_observer, mon.aggr_observer]
    gen = torch.Generator().manual_seed(0)
    logged = {}

    def log(data, step):
        wandb.log(data, step=step)
        logged.update({(step, k): v for k, v in data.items()})

    try:
        for batch_idx in range(STEPS * ACCUMULATION):
            out = model(**synthetic_batch(MODEL_CFG, batch_size=1, generator=gen))
            (out.loss / ACCUMULATION).backward()
            log_step = batch_idx // ACCUMULATION
            # the script logs its own smoothed Python floats
            loss, lr = float(out.loss.detach()), 1e-3 / (1 + log_step)
            log({"VLA Train/Loss": loss, "VLA Train/Learning Rate": lr}, log_step)
            with mon.train_monitor.step(log_step, mode="train") as h:
                h.log(loss=out.loss.detach(), lr=lr,
                      extra={"curr_action_l1_loss": out.loss.detach() / 2})
            log({"monitor/train/loss": loss, "monitor/train/lr": lr,
                 "monitor/train/curr_action_l1_loss": loss / 2}, log_step)
            for observer in observers:
                observer.log_step(log_step)
            if log_step > 0:
                log(script_export(mon), log_step)
        mon.finalize()
    finally:
        run.finish()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    return tmp_path / "r", run_file, logged


def script_export(mon) -> dict:
    """The script's own export from get_summary() (COGVLA.md lists every key)."""
    lfp = mon.lfp_observer.get_summary()
    out = {}
    if lfp["overall"]["count"]:
        overall = lfp["overall"]
        out.update({"monitor/lfp/prune_ratio_mean": overall["prune_ratio"]["mean"],
                    "monitor/lfp/tokens_before_mean": overall["tokens_before"]["mean"],
                    "monitor/lfp/tokens_after_mean": overall["tokens_after"]["mean"],
                    "monitor/lfp/pruned_pct_mean": 1 - overall["prune_ratio"]["mean"]})
        for c, comp in lfp["by_component"].items():
            out[f"monitor/lfp/{c}/prune_ratio"] = comp["prune_ratio"]["mean"]
            out[f"monitor/lfp/{c}/tokens_after"] = comp["tokens_after"]["mean"]
    for part, keys in (("film", ("gamma_norm", "beta_norm", "modulation_strength")),
                       ("moe", ("siglip_weight", "dino_weight", "entropy"))):
        summary = getattr(mon, f"{part}_observer").get_summary()
        out.update({f"monitor/{part}/{k}_mean": summary[k]["mean"] for k in keys
                    if summary[k]["count"]})
    aggr = mon.aggr_observer.get_summary()["compression_ratio"]
    if aggr["count"]:
        out["monitor/aggr/compression_ratio"] = aggr["mean"]
    return out


def monitor_keys(rows: list[dict], script_keys: set[str]) -> tuple[set[str], set[str]]:
    """(scalar keys, histogram keys) the monitor wrote: every key but the script's and
    W&B's own; a histogram shows as nested keys ``{key}/_type``, ``/values``, ``/bins``."""
    scalars, hists = set(), set()
    for row in rows:
        for key in set(row) - script_keys - W_INTERNAL:
            if key.endswith("/_type"):
                hists.add(key[: -len("/_type")])
            elif not key.endswith(("/values", "/bins", "/packedBins")):
                scalars.add(key)
    return scalars, hists


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    pytest.importorskip("wandb")
    tmp_path = tmp_path_factory.mktemp("fork")
    with pytest.MonkeyPatch.context() as mp:
        wandb_offline(tmp_path, mp)
        run_dir, run_file, logged = fork_run(tmp_path, enable_tensorboard=True)
        rows = wandb_history(run_file)
    return run_dir, rows, logged


def test_no_key_is_written_by_both_and_every_script_value_survives(forked):
    run_dir, rows, logged = forked
    script_keys = {k for _, k in logged}
    by_step = {row["_step"]: row for row in rows}
    # every value the script logged is in W&B, unchanged, at its own step: the monitor
    # never wrote one of its keys, nor moved W&B's step past a step the script logs at
    for (step, key), value in logged.items():
        assert by_step[step][key] == pytest.approx(value), (step, key)
    assert [row["_step"] for row in rows] == sorted(by_step)  # one row per step, in order
    scalars, hists = monitor_keys(rows, script_keys)
    assert scalars and not scalars & script_keys
    for key in scalars | hists:
        assert key.startswith("monitor/") and key.rsplit("/", 1)[1] in (*names.FIELDS, "step")
    for key in script_keys:
        assert key.rsplit("/", 1)[1] not in (*names.FIELDS, "step"), key


def test_every_record_lands_at_its_own_step_metric_with_its_values(forked):
    run_dir, rows, _ = forked
    for part, key, metric in ((TRAIN, "monitor/train/loss/mean", "loss"),
                              ("lfp", "monitor/lfp/overall/p_keep/mean", "overall/p_keep"),
                              ("moe", "monitor/moe/dino_weight/max", "dino_weight")):
        records = [r for r in tree(run_dir, "r").records(part) if "metrics" in r]
        prefix = "monitor/train" if part == TRAIN else f"monitor/{part}"
        field = key.rsplit("/", 1)[1]
        got = [(row[f"{prefix}/step"], row[key]) for row in rows if key in row]
        assert got == [(r["step"], pytest.approx(r["metrics"][metric][field])) for r in records]
        # a record is never logged at a W&B row below its own step
        assert all(row["_step"] >= row[f"{prefix}/step"] for row in rows if key in row)


def test_the_default_export_stays_within_200_scalar_keys_with_every_part_on(forked):
    run_dir, rows, logged = forked
    scalars, hists = monitor_keys(rows, {k for _, k in logged})
    assert {k.split("/")[1] for k in scalars} == {"train", "lfp", "film", "moe", "aggr"}
    assert len(scalars) <= 200, len(scalars)
    # per-layer values cost no key per layer: combined, and one series per field
    assert not any("layer_0" in k or "layer_1" in k or "layer_2" in k for k in scalars)
    assert "monitor/film/dino/~layers/gamma_norm/mean" in scalars
    assert "monitor/lfp/~layers/p_keep/mean_hist" in hists
    assert "monitor/lfp/~layers/p_keep/hist" in hists
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    ea = ea_mod.EventAccumulator(str(tensorboard_dir(run_dir)), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert set(tags) == scalars - {f"monitor/{p}/step" for p in
                                   ("train", "lfp", "film", "moe", "aggr")}
    assert len(tags) <= 200


def test_export_all_gives_every_value_of_every_record():
    rec = {"step": 4, "metrics": {
        "layer_08/p_keep": {"mean": 0.5, "std": 0.1, "min": 0.2, "max": 0.9, "count": 6,
                            "nonfinite": 1},
        "overall/p_keep": {"mean": 0.5, "std": 0.1, "min": 0.2, "max": 0.9, "count": 6,
                           "nonfinite": 1}}}
    everything = dict(names.scalars("lfp", "events", rec, export_all=True))
    assert everything == {
        **{f"monitor/lfp/{k}/{f}": rec["metrics"][k][f] for k in rec["metrics"]
           for f in ("mean", "std", "min", "max", "nonfinite")}}
    compact = dict(names.scalars("lfp", "events", rec))
    overall = rec["metrics"]["overall/p_keep"]
    assert compact == {f"monitor/lfp/overall/p_keep/{f}": overall[f]
                       for f in ("mean", "std", "min", "max")} | {
                           "monitor/lfp/~record/nonfinite": 1}
