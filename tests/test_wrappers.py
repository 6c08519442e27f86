"""Attaching through the wrappers training really uses: PEFT LoRA, DDP, FSDP."""

from __future__ import annotations

import warnings

import pytest
import torch
from harness import run_world
from test_cogvla import train
from tree import tensorboard_dir, tree
from workers import read_jsonl

from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla

PARTS = ("lfp", "film", "moe", "aggr")
HOOKS = {"lfp": 24, "film": 14, "moe": 1, "aggr": 4}
PREFIXES = ("module.", "base_model", "_fsdp_wrapped_module", "_orig_mod", "base_layer")


def make(run_dir, **overrides):
    cfg = CogVLAMonitoringConfig(monitor_log_interval=1, pruning_event_log_interval=1,
                                 detailed_log_interval=1, console=False, **overrides)
    return CogVLAMonitoring(run_dir=run_dir, run_id="r", cfg=cfg)


def attach(mon, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # film_sample_layers' index 26 lacks in DINOv2
        return mon.attach(model)


def steps(model, mon, cfg, n=2, seed=0):
    train(model, mon, n, cfg, seed=seed)
    mon.finalize()


def keys_and_paths(run_dir):
    """Every metric/histogram key and meta module path the run wrote."""
    keys = []
    for part in PARTS:
        for kind in ("stream", "detailed"):
            for rec in read_jsonl(tree(run_dir, "r").path(kind, part)):
                keys += list(rec.get("metrics", {})) + list(rec.get("histograms", {}))
    meta = tree(run_dir, "r").meta()
    paths = meta["parts"]["lfp"]["modules"] + [meta["parts"]["moe"]["module"]]
    return keys, paths, meta


@pytest.mark.slow
def test_peft_lora_model_gives_the_bare_models_keys(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = TinyCogVLAConfig(image_size=16)
    bare, bare_mon = build_tiny_cogvla(cfg, seed=0), make(tmp_path / "bare")
    assert attach(bare_mon, bare) == HOOKS
    # LoRA on the LLM and ViT linears, as the CogVLA recipe (not FiLM, routers, projectors)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                              "o_proj", "qkv", "fc1", "fc2"])
    model = peft.get_peft_model(build_tiny_cogvla(cfg, seed=0), lora)
    assert type(model).__name__.startswith("Peft")
    names = [n for n, _ in model.named_modules()]
    assert any(n.startswith("base_model.model.language_model") for n in names)
    assert any(".lora_A." in n for n in names)
    mon = make(tmp_path / "lora")
    assert attach(mon, model) == HOOKS
    steps(model, mon, cfg)
    steps(bare, bare_mon, cfg)
    keys, paths, meta = keys_and_paths(tmp_path / "lora")
    bare_keys, bare_paths, _ = keys_and_paths(tmp_path / "bare")
    assert sorted(set(keys)) == sorted(set(bare_keys)) and paths == bare_paths
    assert not [k for k in keys + paths if any(p in k for p in PREFIXES)]
    assert paths[0] == "language_model.model.layers.8.router"
    assert all(meta["parts"][p]["found"] for p in PARTS)


def _wrapped_world(rank, world_size, run_dir, wrapper):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel as DDP

    from monitor.testing import cogvla_llama, cogvla_vision

    torch.manual_seed(0)
    cfg = TinyCogVLAConfig(image_size=16)
    model = build_tiny_cogvla(cfg, seed=0)
    layer_classes = {cogvla_llama.LlamaDecoderLFPLayer, cogvla_vision.FiLMedVisionTransformerBlock}
    if wrapper == "ddp":
        model = DDP(model, find_unused_parameters=True)
    elif wrapper == "fsdp":  # FSDP1, each decoder layer and ViT block its own unit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy(layer_classes),
                         device_id=torch.device("cpu"), use_orig_params=False)
    else:  # FSDP2
        for module in list(model.modules()):
            if type(module) in layer_classes:
                fully_shard(module)
        fully_shard(model)
    mon = make(run_dir, participation="all", enable_tensorboard=True)
    counts = attach(mon, model)
    steps(model, mon, cfg, n=2, seed=rank)
    return counts


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp", "fsdp2"])
def test_ddp_and_fsdp_wrapped_models_give_clean_keys_and_rank0_alone_writes(tmp_path, wrapper):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    counts = run_world(_wrapped_world, 2, tmp_path, run_dir=str(run_dir), wrapper=wrapper,
                       timeout=180)
    assert counts == [HOOKS, HOOKS]
    keys, paths, meta = keys_and_paths(run_dir)
    assert meta["participation"]["decision"] == "all_ranks"
    assert paths[0] == "language_model.model.layers.8.router"
    assert not [k for k in keys + paths if any(p in k for p in PREFIXES)]
    assert {"layer_08/p_keep", "siglip/layer_09/gamma_norm", "dino_weight",
            "dino/compression_ratio"} <= set(keys)
    rec = tree(run_dir, "r").records("moe")[0]
    assert rec["world_size"] == 2 and rec["metrics"]["entropy"]["count"] == 8  # 2 ranks x 2 x 2
    assert len(list(tensorboard_dir(run_dir).glob("events.out.tfevents.*"))) == 1


def test_paths_of_walks_once_and_matches_path_of_wrapped_or_not():
    from monitor.pruning.adapters import path_of, paths_of

    inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU()))
    wrapped = torch.nn.Module()
    wrapped.module = inner  # a DDP-style wrapper: its segment is dropped
    stranger = torch.nn.Linear(2, 2)
    wanted = [inner[1][0], stranger, inner[0], inner[1][0]]
    assert paths_of(wrapped, wanted) == ["1.0", None, "0", "1.0"]
    assert [path_of(wrapped, m) for m in wanted] == paths_of(wrapped, wanted)
