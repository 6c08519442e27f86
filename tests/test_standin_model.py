"""The tiny CogVLA stand-in keeps the real model's names, paths, call order and shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monitor.testing import (
    DINOV2_TIMM_ID,
    SIGLIP_TIMM_ID,
    FiLMedTokenRouter,
    FiLMedVisionTransformerAggregator,
    FiLMedVisionTransformerBlock,
    LlamaDecoderLayer,
    LlamaDecoderLFPLayer,
    MoEAggregator,
    OpenVLAForActionPrediction,
    PrismaticForConditionalGeneration,
    PrismaticProjector,
    TinyCogVLAConfig,
    TokenRouter,
    build_proprio_projector,
    build_tiny_cogvla,
    synthetic_batch,
)

# COGVLA.md: visual tokens kept of 128 in layers 8..23, then 19 for 24..31
KEPT_OF_128 = [108, 103, 97, 92, 86, 80, 73, 67, 60, 54, 47, 41, 35, 30, 24, 19] + [19] * 8


@pytest.fixture(scope="module")
def cfg():
    return TinyCogVLAConfig()


@pytest.fixture(scope="module")
def vla(cfg):
    return build_tiny_cogvla(cfg, seed=0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def vits(model):
    vb = getattr(model.vision_backbone, "vision_backbone", model.vision_backbone)
    return vb.featurizer, vb.fused_featurizer


def test_classes_and_attribute_paths(vla, cfg):
    assert isinstance(vla, OpenVLAForActionPrediction) and isinstance(
        vla, PrismaticForConditionalGeneration
    )
    assert type(vla.vision_backbone).__name__ == "FiLMedPrismaticVisionBackboneAggregator"
    dino, siglip = vits(vla)
    # the class vit_wrapper_reg.py sets (official CogVLA repository and the public fork)
    assert type(dino).__name__ == type(siglip).__name__ == "FiLMedVisionTransformerAggregator"
    assert vla.config.timm_model_ids == [DINOV2_TIMM_ID, SIGLIP_TIMM_ID]
    assert vla.config.timm_model_ids[0].startswith("vit_large_patch14_reg4_dinov2")
    assert vla.config.timm_model_ids[1].startswith("vit_so400m_patch14_siglip")
    K = cfg.num_vision_aggr
    assert vla.vision_backbone.get_num_patches() == vla.get_num_patches() == K
    assert vla.vision_backbone.vision_backbone.get_num_patches() == 256
    assert vla.vision_backbone.get_num_images_in_input() == 2
    aggr_d, aggr_s = (
        vla.vision_backbone.vision_aggr_featurizer,
        vla.vision_backbone.vision_aggr_fused_featurizer,
    )
    assert isinstance(aggr_d, nn.Parameter) and isinstance(aggr_s, nn.Parameter)
    assert aggr_d.shape == (1, K, dino.embed_dim) and aggr_s.shape == (1, K, siglip.embed_dim)
    assert dino.embed_dim != siglip.embed_dim
    assert isinstance(vla.featurizer_proj, PrismaticProjector)
    assert isinstance(vla.fused_featurizer_proj, PrismaticProjector)
    assert vla.featurizer_proj.fc1.in_features == dino.embed_dim
    assert vla.fused_featurizer_proj.fc1.in_features == siglip.embed_dim
    moe = vla.aggregation_router
    assert isinstance(moe, MoEAggregator) and moe.router_method == "mlp" and moe.num_experts == 2
    assert [type(m) for m in moe.router] == [nn.Linear, nn.GELU, nn.Linear]
    assert moe.router[0].in_features == moe.router[0].out_features == vla.llm_dim
    assert moe.router[2].out_features == 2
    layers = vla.language_model.model.layers
    assert len(layers) == 32
    assert vla.language_model.config.lfp_target_layers == list(range(8, 32))
    for i, layer in enumerate(layers):
        if i < 8:
            assert type(layer) is LlamaDecoderLayer
            continue
        assert type(layer) is LlamaDecoderLFPLayer and isinstance(layer, LlamaDecoderLayer)
        assert isinstance(layer.router, FiLMedTokenRouter) and layer.layer_idx == i
        assert layer.config is vla.language_model.config and layer.config.lfp_enable_film
        assert layer.get_num_patches() == K and layer.get_num_images_in_input() == 2
        assert math.isclose(layer.router_factor, max(0.15, math.cos(i * math.pi / 31) / 2 + 0.5))


def test_vits_depth_prefix_and_patched_forward(vla):
    dino, siglip = vits(vla)
    assert (len(dino.blocks), dino.num_prefix_tokens) == (24, 5)
    assert (len(siglip.blocks), siglip.num_prefix_tokens) == (27, 0)
    for vit in (dino, siglip):
        assert all(type(b) is FiLMedVisionTransformerBlock for b in vit.blocks)
        assert all(
            b.scale.in_features == vla.llm_dim and b.scale.out_features == vit.embed_dim
            for b in vit.blocks
        )
        # as for real: forward is an instance attribute wrapping get_intermediate_layers(n={L-2})
        assert "forward" in vit.__dict__
        assert vit.patch_embed(torch.zeros(2, 3, *vit.patch_embed.img_size)).shape == (
            2,
            256,
            vit.embed_dim,
        )


def test_the_official_class_names_at_every_wrapper_and_the_earlier_names_as_aliases(cfg):
    from monitor import testing

    assert testing.FiLMedVisionTransformerRegister is FiLMedVisionTransformerAggregator
    assert testing.VisionTransformerRegister is testing.VisionTransformerAggregator
    for use_film, use_aggr, backbone, vit_class in (
            (True, True, "FiLMedPrismaticVisionBackboneAggregator",
             "FiLMedVisionTransformerAggregator"),
            (True, False, "FiLMedPrismaticVisionBackbone", "FiLMedVisionTransformer"),
            (False, False, "PrismaticVisionBackbone", "VisionTransformer")):
        vla = build_tiny_cogvla(TinyCogVLAConfig(use_film=use_film, use_aggr=use_aggr,
                                                 image_size=16), seed=0)
        assert type(vla.vision_backbone).__name__ == backbone
        assert {type(v).__name__ for v in vits(vla)} == {vit_class}
        if backbone == "PrismaticVisionBackbone":  # tokens without FiLM (never trained)
            vla.vision_backbone = testing.PrismaticVisionBackboneAggregator(
                vision_backbone=vla.vision_backbone, llm_dim=vla.llm_dim, num_vision_aggr=4)
            assert {type(v).__name__ for v in vits(vla)} == {"VisionTransformerAggregator"}


def record_calls(vla):
    """Forward hooks on the parts a monitor reads; returns (events, handles)."""
    events, handles = [], []
    dino, siglip = vits(vla)

    def add(module, name, with_kwargs=False):
        def hook(mod, args, *rest):
            kwargs, output = (rest[0], rest[1]) if with_kwargs else ({}, rest[0])
            events.append((name, args, kwargs, output))

        handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))

    add(dino, "dino")
    add(siglip, "siglip")
    for enc, vit in (("dino", dino), ("siglip", siglip)):
        add(vit.blocks[0].scale, f"{enc}.scale0")
        add(vit.blocks[0].shift, f"{enc}.shift0")
    add(vla.featurizer_proj, "featurizer_proj")
    add(vla.fused_featurizer_proj, "fused_featurizer_proj")
    add(vla.aggregation_router.router, "moe.router")
    add(vla.aggregation_router, "moe")
    layer8 = vla.language_model.model.layers[8]
    add(layer8.router, "lfp8.router")
    add(layer8.self_attn, "lfp8.self_attn", with_kwargs=True)
    add(vla.language_model.model.layers[0].self_attn, "plain0.self_attn", with_kwargs=True)
    return events, handles


def test_hooks_see_real_shapes_and_call_order(cfg):
    vla = build_tiny_cogvla(cfg, seed=0)
    pp = build_proprio_projector(cfg, seed=0)
    batch = synthetic_batch(cfg, 2, gen(), proprio_projector=pp)
    events, handles = record_calls(vla)
    with torch.no_grad():
        vla(**batch)
    for h in handles:
        h.remove()
    B, K, D = 2, cfg.num_vision_aggr, vla.llm_dim
    top = [e[0] for e in events if e[0] in ("dino", "siglip", "moe")]
    assert top == ["dino", "siglip", "dino", "siglip", "moe", "moe"]
    film = [e[0] for e in events if e[0].endswith(("scale0", "shift0"))]
    assert film == ["dino.scale0", "dino.shift0", "siglip.scale0", "siglip.shift0"] * 2
    by = {}
    for name, args, kwargs, out in events:
        by.setdefault(name, []).append((args, kwargs, out))

    # avg_lang: mean of the raw embeddings of every NON-ACTION token (BOS, prompt, stop, padding)
    emb = vla.get_input_embeddings()(batch["input_ids"])
    non_action = ~(batch["labels"] > cfg.action_token_begin_idx)
    avg_lang = emb[non_action].reshape(B, -1, D).mean(dim=1)
    for enc, width in (("dino", cfg.dino_width), ("siglip", cfg.siglip_width)):
        for args, _, out in by[enc]:
            img, lang = args
            assert img.shape == (B, 3, cfg.image_size, cfg.image_size)
            assert torch.equal(lang, avg_lang)
            assert out.shape == (B, K, width)  # only the K aggregation tokens leave
        for args, _, gamma in by[f"{enc}.scale0"]:
            assert torch.equal(args[0], avg_lang) and gamma.shape == (B, width)
        assert all(out.shape == (B, width) for _, _, out in by[f"{enc}.shift0"])

    for i, (args, _, out) in enumerate(by["moe"]):
        experts, lang = args
        assert isinstance(experts, list) and len(experts) == 2
        dino_proj, siglip_proj = by["featurizer_proj"][i][2], by["fused_featurizer_proj"][i][2]
        assert experts[0] is dino_proj and experts[1] is siglip_proj  # expert 0 is DINOv2
        assert torch.allclose(lang, avg_lang)
        logits = by["moe.router"][i][2]
        assert logits.shape == (B, 2)
        w = torch.softmax(logits, dim=-1)
        assert torch.allclose(
            out, w[:, 0, None, None] * dino_proj + w[:, 1, None, None] * siglip_proj, atol=1e-6
        )
        assert out.shape == (B, K, D)
    outcome = vla.aggregation_router.routing_outcome
    assert outcome.shape == (B, 2) and not torch.allclose(outcome, w)

    ((args, _, logits),) = by["lfp8.router"]
    normed, mask, num_visual = args
    assert normed.shape == (B, 1 + 2 * K + 1 + cfg.prompt_len + cfg.num_action_tokens + 1, D)
    assert mask is None and num_visual == 2 * K and type(num_visual) is int
    assert logits.shape == (B, normed.shape[1], 2)
    ((args, kwargs, _),) = by["lfp8.self_attn"]
    assert args == () and set(kwargs) >= {
        "hidden_states",
        "attention_mask",
        "position_ids",
        "num_vision",
    }
    assert kwargs["num_vision"] == int(2 * K * vla.language_model.model.layers[8].router_factor)
    ((args, kwargs, _),) = by["plain0.self_attn"]
    assert args == () and kwargs["attention_mask"] is None and "num_vision" not in kwargs


def test_film_block_is_identity_at_zero_and_modulates_between_halves(vla):
    blk = vits(vla)[0].blocks[3]
    x, lang = torch.randn(2, 10, 32), torch.randn(2, vla.llm_dim)
    zero = FiLMedVisionTransformerBlock(blk.block, 32, vla.llm_dim)
    nn.init.zeros_(zero.scale.weight), nn.init.zeros_(zero.scale.bias)
    nn.init.zeros_(zero.shift.weight), nn.init.zeros_(zero.shift.bias)
    with torch.no_grad():
        assert torch.allclose(zero(x, lang), blk.block(x), atol=1e-6)
        b = blk.block
        mid = x + b.ls1(b.attn(b.norm1(x)))
        gamma, beta = blk.scale(lang), blk.shift(lang)
        mid = mid * (1 + gamma[:, None]) + beta[:, None]
        assert torch.allclose(blk(x, lang), mid + b.ls2(b.mlp(b.norm2(mid))), atol=1e-6)


def lfp_selection_check(vla, batch):
    """Repeat the layer's top-k inside a router hook; compare with the tokens the layer ran."""
    seen = {}
    handles = []
    for layer in vla.language_model.model.layers:
        if not isinstance(layer, LlamaDecoderLFPLayer):
            continue

        def router_hook(mod, args, logits, layer=layer):
            normed, _, num_visual = args
            p = F.softmax(logits, dim=-1)[:, :, 1]
            force = torch.zeros(p.shape, device=p.device)
            force[:, 0] = force[:, 1 + num_visual :] = torch.inf
            kept_visual = int(num_visual * layer.router_factor)
            kept_len = p.shape[1] - (num_visual - kept_visual)
            idx = torch.topk(p + force, kept_len, dim=1, sorted=True)[1].sort(dim=1)[0]
            seen[layer.layer_idx] = {
                "num_visual": num_visual,
                "idx": idx,
                "normed": normed,
                "S": p.shape[1],
                "kept_visual": ((idx >= 1) & (idx <= num_visual)).sum(1),
            }

        def attn_hook(mod, args, kwargs, layer=layer):
            seen[layer.layer_idx]["attn_in"] = kwargs["hidden_states"]

        handles.append(layer.router.register_forward_hook(router_hook))
        handles.append(layer.self_attn.register_forward_pre_hook(attn_hook, with_kwargs=True))
    with torch.no_grad():
        vla(**batch)
    for h in handles:
        h.remove()
    for rec in seen.values():  # input_layernorm is per token: normed[kept] == layer's attn input
        kept = torch.gather(
            rec["normed"], 1, rec["idx"][..., None].expand(-1, -1, rec["normed"].shape[-1])
        )
        assert torch.equal(kept, rec["attn_in"])
    return seen


def test_lfp_kept_counts_match_cogvla_md_at_128_visual_tokens():
    cfg = TinyCogVLAConfig(num_vision_aggr=64)
    vla = build_tiny_cogvla(cfg, seed=1)
    batch = synthetic_batch(
        cfg, 2, gen(3), pad_tokens=2, proprio_projector=build_proprio_projector(cfg)
    )
    seen = lfp_selection_check(vla, batch)
    assert sorted(seen) == list(range(8, 32))
    for layer_idx, want in zip(range(8, 32), KEPT_OF_128):
        rec = seen[layer_idx]
        assert rec["num_visual"] == 128
        assert rec["kept_visual"].tolist() == [want, want]
        assert rec["attn_in"].shape[1] == rec["S"] - (128 - want)


def test_lfp_with_right_padding_gets_4d_mask(cfg):
    vla = build_tiny_cogvla(cfg, seed=0)
    batch = synthetic_batch(cfg, 3, gen(1), pad_tokens=2)
    masks = []
    h = vla.language_model.model.layers[9].router.register_forward_hook(
        lambda m, a, o: masks.append(a[1])
    )
    seen = lfp_selection_check(vla, batch)
    h.remove()
    mask = masks[0]
    S = seen[9]["S"]
    assert mask.shape == (3, 1, S, S) and mask.dtype == torch.float32
    num_pad = (mask[:, 0, -1, :] == torch.finfo(mask.dtype).min).sum(dim=1)
    assert num_pad.tolist() == [0, 2, 0]
    for layer_idx, rec in seen.items():
        ratio = vla.language_model.model.layers[layer_idx].router_factor
        assert rec["num_visual"] == 2 * cfg.num_vision_aggr
        assert rec["kept_visual"].tolist() == [int(rec["num_visual"] * ratio)] * 3


def test_lfp_layer_skips_routing_for_one_token_and_raises_on_nan(vla):
    layer = vla.language_model.model.layers[10]
    calls = []
    h = layer.router.register_forward_hook(lambda *a: calls.append(1))
    pos = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        out = layer(torch.randn(1, 1, vla.llm_dim), attention_mask=None, position_ids=pos)
    h.remove()
    assert calls == [] and out[0].shape == (1, 1, vla.llm_dim)
    S = 1 + 2 * vla.get_num_patches() + 10
    x = torch.randn(1, S, vla.llm_dim)
    x[0, 3, 0] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="NaN"):
        layer(x, attention_mask=None, position_ids=torch.arange(S)[None])


def test_dead_last_vit_blocks_get_no_gradient(cfg):
    vla = build_tiny_cogvla(cfg, seed=0)
    pp = build_proprio_projector(cfg)
    vla(**synthetic_batch(cfg, 2, gen(), pad_tokens=1, proprio_projector=pp)).loss.backward()
    dino, siglip = vits(vla)
    for vit in (dino, siglip):
        last = len(vit.blocks) - 1
        assert all(p.grad is None for p in vit.blocks[last].parameters())
        for i in range(last):
            assert all(p.grad is not None for p in vit.blocks[i].parameters()), i
    vb = "vision_backbone.vision_backbone."
    dead = (
        vb + "featurizer.blocks.23.",
        vb + "fused_featurizer.blocks.26.",
        vb + "featurizer.norm.",
        vb + "fused_featurizer.norm.",
        vb + "fused_featurizer.attn_pool.",
    )  # norm/attn_pool: never run
    for name, p in vla.named_parameters():
        assert (p.grad is None) == name.startswith(dead), name
    assert all(p.grad is not None for p in pp.parameters())


def test_forward_is_deterministic_with_a_seed(cfg):
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_cogvla(cfg, 0), build_tiny_cogvla(cfg, 0), build_tiny_cogvla(cfg, 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    la = a(**synthetic_batch(cfg, 2, gen(5))).loss
    lb = b(**synthetic_batch(cfg, 2, gen(5))).loss
    lc = c(**synthetic_batch(cfg, 2, gen(5))).loss
    assert torch.equal(la, lb) and not torch.equal(la, lc)
    la.backward(), lb.backward()
    ga = vits(a)[1].blocks[5].scale.weight.grad
    assert torch.equal(ga, vits(b)[1].blocks[5].scale.weight.grad)


@pytest.mark.parametrize(
    "flags",
    [
        {"use_aggr": False},
        {"use_film": False, "use_aggr": False},
        {"use_lfp": False},
        {"lfp_enable_film": False},
    ],
)
def test_variants_run(flags):
    cfg = TinyCogVLAConfig(**flags)
    vla = build_tiny_cogvla(cfg, 0)
    vla(**synthetic_batch(cfg, 2, gen(), pad_tokens=1)).loss.backward()
    if not cfg.use_aggr:
        assert vla.get_num_patches() == 256
    if not cfg.use_lfp:
        assert all(type(layer) is LlamaDecoderLayer for layer in vla.language_model.model.layers)
    if cfg.use_lfp and not cfg.lfp_enable_film:
        assert isinstance(vla.language_model.model.layers[8].router, TokenRouter)


def test_aggregation_without_film_is_refused_like_the_real_code_fails():
    with pytest.raises(ValueError, match="use_aggr without use_film"):
        build_tiny_cogvla(TinyCogVLAConfig(use_film=False))


def test_bf16_autocast_step(cfg):
    vla = build_tiny_cogvla(cfg, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = vla(**synthetic_batch(cfg, 2, gen(), pad_tokens=1)).loss
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_the_stand_in_stays_small_enough_for_a_cpu(cfg):
    """What keeps a step fast, counted instead of timed: parameters and FLOPs of one
    forward at batch 2 (a forward + backward is about 0.4-0.9 s on one thread of the dev
    machine). The backward is about twice the forward (4.69 GFLOP both, measured); the
    counter's own cost is per op, so the forward alone keeps this test short."""
    from torch.utils.flop_counter import FlopCounterMode

    vla = build_tiny_cogvla(cfg, 0)
    batch = synthetic_batch(cfg, 2, gen(), proprio_projector=build_proprio_projector(cfg))
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        vla(**batch)
    assert sum(p.numel() for p in vla.parameters()) < 3_000_000  # 2.58 M measured
    assert flops.get_total_flops() < 2e9  # 1.60 GFLOP measured


def ddp_step(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = TinyCogVLAConfig()
    ddp = DDP(build_tiny_cogvla(cfg, seed=0), find_unused_parameters=True)
    for step in range(2):
        ddp.zero_grad(set_to_none=True)
        ddp(**synthetic_batch(cfg, 2, gen(10 * step + rank))).loss.backward()
    vla = ddp.module
    dino, siglip = vits(vla)
    return {
        "dead_none": all(p.grad is None for p in siglip.blocks[26].parameters())
        and all(p.grad is None for p in dino.blocks[23].parameters()),
        "film_grad": siglip.blocks[5].scale.weight.grad.sum().item(),
        "router_grad": vla.language_model.model.layers[8].router.router.weight.grad.sum().item(),
    }


@pytest.mark.distributed
def test_ddp_find_unused_parameters(tmp_path):
    from harness import run_world

    out = run_world(ddp_step, 2, tmp_path, timeout=120.0)
    assert all(r["dead_none"] for r in out)
    assert out[0]["film_grad"] == pytest.approx(out[1]["film_grad"], rel=1e-6)  # averaged
    assert out[0]["router_grad"] == pytest.approx(out[1]["router_grad"], rel=1e-6)
