"""The CogVLA facade and adapters on the stand-in model (one process, no process group)."""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import pytest
import torch
from reference import assert_matches, reference_stats
from tree import tree
from workers import read_jsonl

from monitor.layout import TRAIN, folder_of
from monitor.pruning.adapters import clean_name, unwrap
from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.pruning.adapters.cogvla_wiring import find_encoders
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch

PARTS = ("lfp", "film", "moe", "aggr")


def make(tmp_path, run_id="r", **overrides):
    cfg = CogVLAMonitoringConfig(**{"monitor_log_interval": 2, "pruning_event_log_interval": 2,
                                    "detailed_log_interval": 4, **overrides})
    return CogVLAMonitoring(run_dir=tmp_path / run_id, run_id=run_id, config_name="test", cfg=cfg)


def attach_quietly(mon, model):
    """attach(), returning the warnings it raised (none for the released settings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = mon.attach(model)
    return counts, [str(w.message) for w in caught]


def train(model, mon, steps, cfg, batch_size=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):  # the seed guide's order: the step calls after the forward
        out = model(**synthetic_batch(cfg, batch_size=batch_size, generator=gen))
        out.loss.backward()
        if mon is not None:
            mon.log_step(step)
            with mon.step(step) as h:
                h.log(loss=out.loss.detach(), lr=1e-3)
    return out


@pytest.fixture(scope="module")
def cfg():
    return TinyCogVLAConfig(image_size=16)  # 64 patches instead of 256: a faster step


def test_facade_writes_every_stream_and_finalize_returns_each_part(tmp_path, cfg, caplog):
    model = build_tiny_cogvla(cfg, seed=0)
    mon = make(tmp_path)
    with caplog.at_level(logging.INFO, logger="monitor"):
        counts, caught = attach_quietly(mon, model)
    assert counts == {"lfp": 24, "film": 14, "moe": 1, "aggr": 4}
    # the released [0, 9, 18, 26]: 26 exists in SigLIP (27 blocks), not DINOv2 (24):
    # expected, so said once at INFO (and in meta), never warned
    assert caught == []
    notes = [r.getMessage() for r in caplog.records if r.name == "monitor"]
    assert notes == ["monitor film: film_sample_layers indices an encoder lacks are skipped "
                     "(blocks per encoder: dino 24, siglip 27): dino/layer_26"]
    assert caplog.records[0].levelno == logging.INFO
    train(model, mon, 5, cfg)
    paths = mon.finalize()
    assert set(paths) == {"train", *PARTS}
    run = tmp_path / "r"
    assert paths["train"] == str(tree(run, "r").path("summary"))
    for part in PARTS:
        assert paths[part] == str(tree(run, "r").path("summary", part))
        events = tree(run, "r").records(part)
        assert [r["step"] for r in events] == [0, 2, 4]
        assert tree(run, "r").detailed(part)
        summary = tree(run, "r").summary(part)
        assert summary["status"] == "completed" and summary["part"] == part
        for rec in events:
            for value in rec["metrics"].values():
                assert set(value) == {"mean", "std", "min", "max", "count", "nonfinite",
                                      "min_rank", "max_rank"}
    meta = tree(run, "r").meta()
    assert meta["parts"]["film"]["skipped"] == ["dino/layer_26"]
    assert {e["class"] for e in meta["parts"]["film"]["encoders"].values()} == {
        "FiLMedVisionTransformerAggregator"}  # the official class name
    assert meta["parts"]["aggr"]["encoders"]["siglip"]["class"] == \
        "FiLMedVisionTransformerAggregator"
    assert meta["parts"]["film"]["dead_blocks"] == {"dino": 23, "siglip": 26}
    assert meta["parts"]["film"]["sampled_dead_blocks"] == ["siglip/layer_26"]
    assert meta["parts"]["lfp"]["layers"] == list(range(8, 32))
    assert mon.finalize() == paths


def test_get_summary_has_the_keys_the_public_script_reads(tmp_path, cfg):
    model = build_tiny_cogvla(cfg, seed=0)
    mon = make(tmp_path)
    attach_quietly(mon, model)
    lfp = mon.lfp_observer.get_summary()
    assert lfp["overall"]["count"] == 0 and lfp["overall"]["prune_ratio"]["mean"] is None
    train(model, mon, 3, cfg)
    lfp = mon.lfp_observer.get_summary()
    overall = lfp["overall"]
    assert isinstance(overall["count"], int) and overall["count"] > 0
    for key in ("prune_ratio", "tokens_before", "tokens_after"):
        assert isinstance(overall[key]["mean"], float)
    for name, comp in lfp["by_component"].items():
        assert name.startswith("layer_") and comp["count"] > 0
        assert comp["prune_ratio"]["mean"] == comp["tokens_after"]["mean"] / comp[
            "tokens_before"]["mean"]
    film = mon.film_observer.get_summary()
    moe = mon.moe_observer.get_summary()
    aggr = mon.aggr_observer.get_summary()
    for summary, keys in ((film, ("gamma_norm", "beta_norm", "modulation_strength")),
                          (moe, ("siglip_weight", "dino_weight", "entropy")),
                          (aggr, ("compression_ratio",))):
        for key in keys:
            assert summary[key]["count"] > 0 and isinstance(summary[key]["mean"], float)
    assert moe["dino_weight"]["mean"] + moe["siglip_weight"]["mean"] == pytest.approx(1.0)
    num_patches = (cfg.image_size // cfg.patch_size) ** 2
    assert aggr["compression_ratio"]["mean"] == num_patches / cfg.num_vision_aggr
    mon.finalize()


def test_lfp_adapter_selects_exactly_the_tokens_the_layer_keeps_even_on_ties(
        tmp_path, cfg, monkeypatch):
    model = build_tiny_cogvla(cfg, seed=0)
    layers = model.language_model.model.layers
    with torch.no_grad():  # every p_keep exactly 0.5 in one layer: ties everywhere
        layers[12].router.router.weight.zero_()
        layers[12].router.router.bias.zero_()
    mon = make(tmp_path, enable_film_monitor=False)
    mon.attach(model)
    calls = []
    real_topk = torch.topk

    def recording_topk(values, k, *args, **kwargs):
        out = real_topk(values, k, *args, **kwargs)
        calls.append(out.indices.sort(dim=1).values.clone())
        return out

    monkeypatch.setattr(torch, "topk", recording_topk)
    train(model, mon, 1, cfg, batch_size=3)
    monkeypatch.undo()
    # the 24 LFP layers' own calls in the forward, then the adapter's 24 (layer by layer)
    # when the pass is drained at the flush
    assert len(calls) == 2 * 24
    for theirs, ours in zip(calls[:24], calls[24:]):
        assert torch.equal(ours, theirs)
    nv = cfg.num_vision_aggr * cfg.num_images_in_input
    tied = calls[24 + 4]  # layer 12 is the 5th LFP layer
    visual_slice_pick = real_topk(torch.full((3, nv), 0.5), int(nv * layers[12].router_factor),
                                  dim=1).indices.sort(dim=1).values + 1
    kept_visual = tied[(tied >= 1) & (tied <= nv)].reshape(3, -1)
    assert kept_visual.shape == visual_slice_pick.shape
    assert not torch.equal(kept_visual, visual_slice_pick)  # why the adapter repeats the call
    mon.finalize()
    rec = tree(tmp_path / "r", "r").records("lfp")[0]["metrics"]
    for idx in range(8, 32):
        kept = int(nv * layers[idx].router_factor)
        assert rec[f"layer_{idx:02d}/tokens_after"]["mean"] == kept
        assert rec[f"layer_{idx:02d}/tokens_before"]["mean"] == nv
    assert rec["layer_12/p_keep"]["min"] == rec["layer_12/p_keep"]["max"] == 0.5
    assert rec["layer_12/margin"]["mean"] == 0.0


def test_moe_weights_are_the_modules_real_mixing_weights(tmp_path, cfg):
    model = build_tiny_cogvla(cfg, seed=1)
    mon = make(tmp_path, enable_lfp_monitor=False, enable_film_monitor=False)
    mon.attach(model)
    seen = []
    moe = model.aggregation_router

    def capture(module, args):
        feats, logits = args
        for layer in module.router:  # its children: calling .router would fire our hook
            logits = layer(logits)
        seen.append(torch.softmax(logits, dim=-1).detach())
        # the module's output is w0 * feats[0] + w1 * feats[1]: the weights it really used
        seen[-1].feats = [f.detach() for f in feats]

    handle = moe.register_forward_pre_hook(capture)
    outputs = []
    out_handle = moe.register_forward_hook(lambda m, a, o: outputs.append(o.detach()))
    train(model, mon, 1, cfg, batch_size=3)
    handle.remove()
    out_handle.remove()
    assert len(seen) == cfg.num_images_in_input
    for w, out in zip(seen, outputs):
        mixed = w[:, 0].view(-1, 1, 1) * w.feats[0] + w[:, 1].view(-1, 1, 1) * w.feats[1]
        torch.testing.assert_close(mixed, out)
        assert not torch.allclose(w, moe.routing_outcome.detach())
    mon.finalize()
    rec = tree(tmp_path / "r", "r").records("moe")[0]["metrics"]
    weights = torch.cat(seen).double().numpy()
    # the module's softmax ran in float32, the observer's in float64
    for name, column in (("dino_weight", weights[:, 0]), ("siglip_weight", weights[:, 1])):
        assert_matches(rec[name], reference_stats([column]), rel=1e-6, abs_=1e-7)
    entropy = -(weights * np.log(weights)).sum(axis=1)
    assert_matches(rec["entropy"], reference_stats([entropy]), rel=1e-6, abs_=1e-7)


def test_encoders_are_named_from_the_model_not_from_attribute_names(cfg):
    model = build_tiny_cogvla(cfg, seed=0)
    assert [(e["attr"], e["name"]) for e in find_encoders(model)] == [
        ("featurizer", "dino"), ("fused_featurizer", "siglip")]
    model.config.timm_model_ids = list(reversed(model.config.timm_model_ids))
    assert [e["name"] for e in find_encoders(model)] == ["siglip", "dino"]


def test_model_outputs_and_gradients_are_identical_with_and_without_the_monitor(tmp_path, cfg):
    plain, watched = build_tiny_cogvla(cfg, seed=3), build_tiny_cogvla(cfg, seed=3)
    mon = make(tmp_path)
    attach_quietly(mon, watched)
    out_plain = train(plain, None, 3, cfg)
    out_watched = train(watched, mon, 3, cfg)
    mon.finalize()
    assert torch.equal(out_plain.loss, out_watched.loss)
    assert torch.equal(out_plain.logits, out_watched.logits)
    for (name, p), (_, q) in zip(plain.named_parameters(), watched.named_parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            assert torch.equal(p.grad, q.grad), name


def test_attach_twice_is_harmless_and_finalize_removes_every_hook(tmp_path, cfg):
    model = build_tiny_cogvla(cfg, seed=0)
    before = {n: (dict(m._forward_hooks), dict(m._forward_hooks_with_kwargs))
              for n, m in model.named_modules()}
    mon = make(tmp_path)
    first, _ = attach_quietly(mon, model)
    second, _ = attach_quietly(mon, model)
    assert first == second
    assert sum(len(m._forward_hooks) for m in model.modules()) == sum(first.values())
    mon.finalize()
    mon.finalize()
    after = {n: (dict(m._forward_hooks), dict(m._forward_hooks_with_kwargs))
             for n, m in model.named_modules()}
    assert after == before
    with pytest.raises(RuntimeError, match="after finalize"):
        mon.attach(model)


class _FakeLoraModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.peft_config = {"default": None}

    def forward(self, **kwargs):
        return self.model(**kwargs)


class _FakePeftModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.base_model = _FakeLoraModel(model)
        self.peft_config = {"default": None}

    def forward(self, **kwargs):
        return self.base_model(**kwargs)


class DistributedDataParallel(torch.nn.Module):  # the wrapper's class name is what counts
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_wrapped_models_give_the_same_keys_without_wrapper_prefixes(tmp_path, cfg):
    bare = build_tiny_cogvla(cfg, seed=0)
    wrapped = DistributedDataParallel(_FakePeftModel(bare))
    assert unwrap(wrapped) is bare
    name = next(n for n, _ in wrapped.named_modules() if n.endswith("aggregation_router"))
    assert name == "module.base_model.model.aggregation_router"
    assert clean_name(name) == "aggregation_router"
    mon = make(tmp_path)
    attach_quietly(mon, wrapped)
    train(wrapped, mon, 1, cfg)
    mon.finalize()
    meta = tree(tmp_path / "r", "r").meta()
    assert meta["parts"]["moe"]["module"] == "aggregation_router.router"
    assert meta["parts"]["lfp"]["modules"][0] == "language_model.model.layers.8.router"
    for part in PARTS:
        rec = tree(tmp_path / "r", "r").records(part)[0]
        assert not any("module" in k or "base_model" in k for k in rec["metrics"])


def test_a_part_without_modules_warns_once_and_says_so_in_meta(tmp_path):
    cfg = TinyCogVLAConfig(use_lfp=False, image_size=16)
    model = build_tiny_cogvla(cfg, seed=0)
    mon = make(tmp_path, film_sample_layers=[0, 9])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = mon.attach(model)
    assert counts["lfp"] == 0
    assert [str(w.message) for w in caught] == [
        "monitor lfp: enabled but no LFP module was found in the model; nothing will be "
        "recorded for it (see meta)"]
    train(model, mon, 2, cfg)
    mon.finalize()
    meta = tree(tmp_path / "r", "r").meta()
    assert meta["parts"]["lfp"]["found"] is False
    assert not tree(tmp_path / "r", "r").records("lfp")


def test_attach_refuses_what_is_not_a_module(tmp_path):
    mon = make(tmp_path)
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got dict"):
        mon.attach({"not": "a model"})
    mon.finalize()


def test_only_the_train_monitor_on_logs_loss_and_no_observer(tmp_path, cfg):
    model = build_tiny_cogvla(cfg, seed=0)
    mon = make(tmp_path, enable_lfp_monitor=False, enable_film_monitor=False,
               enable_moe_monitor=False, enable_aggr_monitor=False)
    assert mon.attach(model) == {}
    assert (mon.lfp_observer, mon.film_observer, mon.moe_observer, mon.aggr_observer) == (
        None, None, None, None)
    train(model, mon, 3, cfg)
    assert mon.finalize() == {"train": str(tree(tmp_path / "r", "r").path("summary"))}
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [folder_of(TRAIN)]


def test_config_defaults_are_the_usage_guides():
    cfg = CogVLAMonitoringConfig()
    assert (cfg.monitor_log_interval, cfg.detailed_log_interval,
            cfg.pruning_event_log_interval) == (100, 500, 10)
    assert cfg.film_sample_layers == [0, 9, 18, 26] and cfg.enable_tensorboard is False
    assert all((cfg.enable_train_monitor, cfg.enable_lfp_monitor, cfg.enable_film_monitor,
                cfg.enable_moe_monitor, cfg.enable_aggr_monitor))


def test_every_name_the_public_script_imports_exists():
    from monitor import Monitor, PruningObserver
    from monitor.pruning.adapters.cogvla import (
        AggregationObserver,
        CogVLAAggregationAdapter,
        CogVLAFiLMAdapter,
        CogVLALfpAdapter,
        CogVLAMoEAdapter,
        CogVLAMonitoring,
        CogVLAMonitoringConfig,
        FiLMObserver,
        MoERouterObserver,
    )

    assert Monitor.__name__ == "Monitor" and PruningObserver.part == "lfp"
    assert (FiLMObserver.part, MoERouterObserver.part, AggregationObserver.part) == (
        "film", "moe", "aggr")
    for cls in (CogVLALfpAdapter, CogVLAFiLMAdapter, CogVLAMoEAdapter, CogVLAAggregationAdapter,
                CogVLAMonitoring, CogVLAMonitoringConfig):
        assert callable(cls)


def test_hooks_read_nothing_back_to_the_host_between_flushes(tmp_path, cfg):
    """Calls that move tensor data to the host, made by monitor code while steps run."""
    from monitor.testing.probes import HostSyncSpy

    model = build_tiny_cogvla(cfg, seed=0)
    mon = make(tmp_path, monitor_log_interval=50, pruning_event_log_interval=50,
               detailed_log_interval=50)
    attach_quietly(mon, model)
    train(model, mon, 2, cfg)  # step 0 is due; its flush runs at step 1's first call
    gen = torch.Generator().manual_seed(5)
    with HostSyncSpy(only_from="monitor") as between:
        for step in range(2, 5):
            out = model(**synthetic_batch(cfg, batch_size=2, generator=gen))
            out.loss.backward()
            mon.log_step(step)
            with mon.step(step) as h:
                h.log(loss=out.loss.detach(), lr=1e-3)
    assert between.calls == []
    with HostSyncSpy(only_from="monitor") as at_flush:
        mon.finalize()  # the flush reads results back: the one place the host waits
    assert at_flush.calls


def test_padding_is_left_out_of_the_force_kept_tokens(tmp_path, cfg):
    model = build_tiny_cogvla(cfg, seed=0)
    mon = make(tmp_path, enable_film_monitor=False, enable_moe_monitor=False,
               enable_aggr_monitor=False)
    mon.attach(model)
    lengths = []
    handle = model.language_model.model.layers[8].router.register_forward_hook(
        lambda m, args, out: lengths.append(args[0].shape[1]))
    batch = synthetic_batch(cfg, batch_size=2, generator=torch.Generator().manual_seed(0),
                            pad_tokens=3)  # the second sample ends in 3 pad tokens
    model(**batch).loss.backward()
    mon.log_step(0)
    handle.remove()
    mon.finalize()
    nv = cfg.num_vision_aggr * cfg.num_images_in_input
    rec = tree(tmp_path / "r", "r").records("lfp")[0]["metrics"]
    (seq_len,) = lengths
    for idx in range(8, 32):
        assert rec[f"layer_{idx:02d}/forced_p_keep"]["count"] == 2 * (seq_len - nv) - 3


def test_config_takes_numpy_ints_for_film_layers():
    assert CogVLAMonitoringConfig(film_sample_layers=np.array([0, 9])).film_sample_layers == [0, 9]


def test_step_with_the_train_monitor_off_still_moves_the_observers(tmp_path, cfg):
    model = build_tiny_cogvla(cfg, seed=0)
    mon = make(tmp_path, enable_train_monitor=False, enable_lfp_monitor=False,
               enable_film_monitor=False, enable_aggr_monitor=False)
    mon.attach(model)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        model(**synthetic_batch(cfg, batch_size=2, generator=gen)).loss.backward()
        with pytest.warns(RuntimeWarning, match="enable_train_monitor is False") if step == 0 \
                else contextlib.nullcontext():
            with mon.step(step) as h:
                h.log(loss=1.0)
    mon.finalize()
    steps = [r["step"] for r in tree(tmp_path / "r", "r").records("moe")]
    assert steps == [0, 2]


def test_finalize_writes_eval_values_a_raising_context_left_pending(tmp_path):
    mon = make(tmp_path, enable_lfp_monitor=False, enable_film_monitor=False,
               enable_moe_monitor=False, enable_aggr_monitor=False)
    with pytest.raises(KeyError):
        with mon.step(3, mode="eval") as h:
            h.log(loss=0.5)
            raise KeyError("eval loop broke")
    mon.finalize()
    recs = tree(tmp_path / "r", "r").records()
    assert [(r["step"], r["mode"], r["metrics"]["loss"]["count"]) for r in recs] == [
        (3, "eval", 1)]


def test_each_adapter_also_attaches_to_its_own_part_of_the_model(tmp_path, cfg):
    from monitor import MonitorSession
    from monitor.pruning import (
        AggregationObserver,
        FiLMObserver,
        MoERouterObserver,
        PruningObserver,
    )
    from monitor.pruning.adapters.cogvla import (
        CogVLAAggregationAdapter,
        CogVLAFiLMAdapter,
        CogVLALfpAdapter,
        CogVLAMoEAdapter,
    )

    model = build_tiny_cogvla(cfg, seed=0)
    session = MonitorSession(tmp_path / "parts", "p")
    lfp, film = PruningObserver(session), FiLMObserver(session)
    moe, aggr = MoERouterObserver(session), AggregationObserver(session)
    assert CogVLALfpAdapter(lfp).attach(model.language_model) == 24
    assert CogVLAFiLMAdapter(film, [0, 9]).attach(model.vision_backbone) == 8
    assert CogVLAMoEAdapter(moe).attach(model.aggregation_router) == 1
    assert CogVLAAggregationAdapter(aggr).attach(model.vision_backbone) == 4
    assert film.components == ["dino/layer_00", "dino/layer_09", "siglip/layer_00",
                               "siglip/layer_09"]
    assert aggr.encoders == ["dino", "siglip"]
    model(**synthetic_batch(cfg, batch_size=2, generator=torch.Generator().manual_seed(0)))
    session.scheduler.advance(0)
    for obs in (lfp, film, moe, aggr):
        obs.finalize()
        assert read_jsonl(obs.jsonl_path), obs.part


def test_a_first_forward_under_inference_mode_does_not_break_later_flushes(tmp_path, cfg):
    model = build_tiny_cogvla(cfg, seed=0)
    mon = make(tmp_path, film_sample_layers=[0], pruning_event_log_interval=1)
    mon.attach(model)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # e.g. a sanity rollout before training starts
        model(**synthetic_batch(cfg, batch_size=2, generator=gen))
        mon.log_step(0)
        with mon.step(0, mode="eval") as h:
            h.log(success=torch.tensor([1.0, 0.0]))
    for step in range(1, 3):
        out = model(**synthetic_batch(cfg, batch_size=2, generator=gen))
        out.loss.backward()
        mon.log_step(step)
        with mon.step(step) as h:
            h.log(loss=out.loss.detach())
    mon.finalize()
    moe = tree(tmp_path / "r", "r").records("moe")
    assert [(r["step"], r["metrics"]["dino_weight"]["count"]) for r in moe] == [
        (0, 4), (1, 4), (2, 4)]


def test_film_layers_that_match_no_block_are_the_one_film_warning(tmp_path, cfg):
    model = build_tiny_cogvla(cfg, seed=0)
    mon = make(tmp_path, film_sample_layers=[27, 40], enable_lfp_monitor=False,
               enable_moe_monitor=False, enable_aggr_monitor=False)
    with pytest.warns(RuntimeWarning, match=r"film_sample_layers \[27, 40\] match no FiLM "
                                            r"block \(blocks per encoder: dino 24, siglip 27\)"):
        assert mon.attach(model) == {"film": 0}
    mon.finalize()
