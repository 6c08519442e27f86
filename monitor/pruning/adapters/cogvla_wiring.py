"""Where CogVLA's routing and modulation live, and which tensor each observer gets.

Wiring only (module paths, call signatures, which output is which): the statistics are
computed by the generic observers. Paths are relative to the unwrapped VLA ``R`` (see
:func:`monitor.pruning.adapters.unwrap`); keys never contain module paths.

==========  ==========================================================  ===========================
adapter     hooked module(s)                                            what the observer gets
==========  ==========================================================  ===========================
LFP         ``R.language_model.model.layers[l].router`` for l in
            ``lfp_target_layers``                                       p_keep, the kept set (the
                                                                        layer's own top-k, redone)
FiLM        ``<vit>.blocks[i].scale`` / ``.shift`` for i in
            ``film_sample_layers``, each encoder                        gamma / beta ``(B, width)``
MoE         ``R.aggregation_router.router``                             logits ``(B, 2)``
Aggr        ``<vit>.patch_embed`` and ``<vit>`` itself                  tokens in/out, the K tokens
==========  ==========================================================  ===========================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from monitor.pruning.adapters import get_path, path_of, paths_of, unwrap
from monitor.pruning.aggregation import AggregationObserver
from monitor.pruning.film import FiLMObserver
from monitor.pruning.moe import MoERouterObserver
from monitor.pruning.routing import PruningObserver

log = logging.getLogger("monitor")

ENCODER_ATTRS = (("featurizer", "vision_aggr_featurizer"),
                 ("fused_featurizer", "vision_aggr_fused_featurizer"))
# OpenVLA's dinosiglip backbone builds `featurizer` from its first timm id (DINOv2) and
# `fused_featurizer` from its second (SigLIP); used only when the model does not say.
DEFAULT_ENCODER_NAMES = {"featurizer": "dino", "fused_featurizer": "siglip"}
KNOWN_FAMILIES = (("dino", "dino"), ("siglip", "siglip"), ("clip", "clip"))
# (depth, width, prefix tokens) of the released encoders
KNOWN_SHAPES = {(24, 1024, 5): "dino", (27, 1152, 0): "siglip"}
# What each wrapped ViT class carries: the class CogVLA's wrappers set with
# `vit.__class__ = ...` (prismatic/models/vit_wrapper_reg.py, film_vit_wrapper.py), then
# the earlier names of the monitor's stand-in (kept: harmless). Encoders are still found
# by path and FiLM blocks by their .scale/.shift; the class goes into meta.
VIT_CLASSES = {
    "FiLMedVisionTransformerAggregator": ("film", "aggregation"),
    "VisionTransformerAggregator": ("aggregation",),
    "FiLMedVisionTransformer": ("film",),
    "VisionTransformer": (),
    "FiLMedVisionTransformerRegister": ("film", "aggregation"),
    "VisionTransformerRegister": ("aggregation",),
}


def vision_backbone_of(root: torch.nn.Module) -> torch.nn.Module | None:
    """The module that holds ``featurizer``: under the VLA (inside the FiLM/aggregation
    wrapper or bare), under the wrapper, or ``root`` itself."""
    for vb in (get_path(root, "vision_backbone.vision_backbone"),
               get_path(root, "vision_backbone"), root):
        if isinstance(vb, torch.nn.Module) and isinstance(getattr(vb, "featurizer", None),
                                                          torch.nn.Module):
            return vb
    return None


def aggregation_wrapper_of(root: torch.nn.Module) -> torch.nn.Module | None:
    """The module holding the aggregation tokens: ``R.vision_backbone`` or ``root`` itself."""
    for wrapper in (get_path(root, "vision_backbone"), root):
        if isinstance(wrapper, torch.nn.Module) and any(
                hasattr(wrapper, attr) for _, attr in ENCODER_ATTRS):
            return wrapper
    return None


def moe_router_of(root: torch.nn.Module) -> torch.nn.Module | None:
    """``R.aggregation_router.router``, or ``.router`` of ``root`` when it is the MoE module."""
    for owner in (get_path(root, "aggregation_router"), root):
        router = getattr(owner, "router", None)
        if isinstance(router, torch.nn.Module) and hasattr(owner, "routing_outcome"):
            return router
    return None


def find_encoders(root: torch.nn.Module) -> list[dict]:
    """The vision encoders in MoE expert order, each named from the model itself.

    Returns dicts ``{"attr", "name", "module", "how", "class", "carries"}``. The name
    comes from the config's ``timm_model_ids`` (entry i for encoder i), else from the
    encoder's depth, width and prefix tokens, else from OpenVLA's attribute convention;
    ``how`` says which. ``class`` is the ViT's class name (``FiLMedVisionTransformerAggregator``
    in the released models) and ``carries`` what :data:`VIT_CLASSES` says it adds
    (None for a class it does not know).
    """
    vb = vision_backbone_of(root)
    if vb is None:
        return []
    ids = getattr(getattr(root, "config", None), "timm_model_ids", None)
    found, taken = [], set()
    for i, (attr, _) in enumerate(ENCODER_ATTRS):
        vit = getattr(vb, attr, None)
        if not isinstance(vit, torch.nn.Module):
            continue
        name, how = _encoder_name(vit, ids[i] if isinstance(ids, (list, tuple)) and
                                  len(ids) > i else None)
        if name is None:
            name, how = DEFAULT_ENCODER_NAMES[attr], f"OpenVLA convention for {attr!r}"
        if name in taken:
            name = f"{name}{i}"
        taken.add(name)
        cls = type(vit).__name__
        found.append({"attr": attr, "name": name, "module": vit, "how": how, "class": cls,
                      "carries": VIT_CLASSES.get(cls)})
    return found


def _encoder_name(vit: torch.nn.Module, model_id: object) -> tuple[str | None, str]:
    if isinstance(model_id, str):
        for needle, name in KNOWN_FAMILIES:
            if needle in model_id.lower():
                return name, f"config.timm_model_ids: {model_id}"
    blocks = getattr(vit, "blocks", None)
    shape = (len(blocks) if blocks is not None else -1, getattr(vit, "embed_dim", -1),
             getattr(vit, "num_prefix_tokens", -1))
    if shape in KNOWN_SHAPES:
        return KNOWN_SHAPES[shape], f"depth/width/prefix tokens {shape}"
    return None, ""


def film_blocks(vit: torch.nn.Module) -> list[torch.nn.Module | None]:
    """Each block of ``vit`` if it is FiLMed (has ``.scale`` and ``.shift``), else None."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        return []
    return [b if isinstance(getattr(b, "scale", None), torch.nn.Module)
            and isinstance(getattr(b, "shift", None), torch.nn.Module) else None
            for b in blocks]


def llm_layers(root: torch.nn.Module) -> tuple[Sequence[torch.nn.Module], object]:
    """The decoder layers and the language model's config (``lfp_target_layers``), under
    the VLA (``R.language_model``) or under ``root`` itself (a bare causal LM or model)."""
    for owner in (getattr(root, "language_model", None), root):
        if owner is None:
            continue
        for path in ("model.layers", "layers"):
            layers = get_path(owner, path)
            if isinstance(layers, torch.nn.ModuleList):
                return list(layers), getattr(owner, "config", None)
    return [], None


def padding_of(attention_mask: object, batch: int, seq_len: int) -> torch.Tensor | None:
    """``(B, S)`` True at padded positions, from the router's mask (4-d additive or 2-d)."""
    if not isinstance(attention_mask, torch.Tensor):
        return None
    m = attention_mask
    if m.dim() == 4 and m.is_floating_point() and m.shape[-1] == seq_len:
        return m[:, 0, -1, :] == torch.finfo(m.dtype).min
    if m.dim() == 2 and m.shape == (batch, seq_len):
        return m == 0
    return None


class CogVLALfpAdapter:
    """Feeds a :class:`PruningObserver` from every LFP layer's router (components
    ``layer_{l:02d}``): candidates are the visual tokens 1 .. num_visual; the force-kept
    tokens are BOS and every token after them, padding excluded when the router gets the
    attention mask (``FiLMedTokenRouter``)."""

    def __init__(self, observer: PruningObserver,
                 target_layers: Sequence[int] | None = None) -> None:
        self.observer = observer
        self.target_layers = None if target_layers is None else [int(t) for t in target_layers]

    def attach(self, model: torch.nn.Module) -> int:
        root = unwrap(model)
        layers, config = llm_layers(root)
        targets = self.target_layers
        how = "argument"
        if targets is None:
            targets = getattr(config, "lfp_target_layers", None)
            how = "config.lfp_target_layers"
        if targets is None:
            targets = [i for i, layer in enumerate(layers) if hasattr(layer, "router_factor")]
            how = "layers with a router_factor"
        chosen: list[int] = []
        missing: list[int] = []
        for idx in targets:
            layer = layers[idx] if 0 <= idx < len(layers) else None
            ok = layer is not None and isinstance(getattr(layer, "router", None),
                                                  torch.nn.Module)
            (chosen if ok else missing).append(idx)
        comps = [f"layer_{idx:02d}" for idx in chosen]
        self.observer.add_components(comps)
        lfp_layers: list[Any] = [layers[idx] for idx in chosen]  # routers checked above
        for lfp_layer, comp in zip(lfp_layers, comps):
            self.observer.hook(lfp_layer.router, self._hook(lfp_layer, comp),
                               name=f"{comp}.router")
        self.observer.describe(
            layers=chosen, layers_from=how, missing_layers=missing,
            router_factor={c: float(lay.router_factor) for lay, c in zip(lfp_layers, comps)},
            modules=paths_of(root, [lay.router for lay in lfp_layers]))
        return len(chosen)

    def _hook(self, layer: torch.nn.Module, component: str):
        observer = self.observer

        def on_router(module, args, kwargs, logits):
            if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] < 2:
                return
            nv = _num_visual(layer, args, kwargs)
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            # the layer only reads these (never in place): held until the pass is drained
            logits = logits.detach()
            mask = mask if isinstance(mask, torch.Tensor) else None
            item = (component, nv, float(layer.router_factor), mask, observer.current_groups,
                    logits, observer.inplace_version(logits))
            observer.defer(("router", component), self._routing_pass, item)

        return on_router

    def _routing_pass(self, items: list[tuple]) -> None:
        """Every router call of one forward pass: the softmax and the observer's
        statistics batched over layers; the top-k per layer, as each layer calls it."""
        groups: dict[tuple, list[tuple]] = {}
        for item in self.observer.unchanged(items):
            _, nv, _, mask, labels, logits, _ = item
            groups.setdefault((logits.shape, logits.dtype, logits.device, nv, id(mask),
                               id(labels)), []).append(item)
        for group in groups.values():
            _, nv, _, mask, labels, _, _ = group[0]
            p_keep, kept = lfp_selection_many(torch.stack([it[5] for it in group]), nv,
                                              [it[2] for it in group])
            pad = padding_of(mask, p_keep.shape[1], p_keep.shape[2])
            forced = torch.cat([p_keep[:, :, :1], p_keep[:, :, 1 + nv:]], dim=2)
            valid = None
            if pad is not None:
                valid = ~torch.cat([pad[:, :1], pad[:, 1 + nv:]], dim=1)
                valid = valid.unsqueeze(0).expand(forced.shape)
            self.observer.observe_many([it[0] for it in group], p_keep[:, :, 1:1 + nv],
                                       kept[:, :, 1:1 + nv], forced, valid, labels=labels)


def lfp_selection_many(router_logits: torch.Tensor, num_visual: int,
                       router_factors: Sequence[float]):
    """The LFP layers' own selection, repeated call for call, for ``L`` router calls
    stacked ``(L, B, S, 2)`` (each layer's ``router_factor`` in ``router_factors``).

    ``LlamaDecoderLFPLayer.forward`` takes ``p_keep = softmax(logits)[..., 1]``, adds a
    float32 mask of +inf at position 0 and at every position after the visual tokens, and
    keeps ``torch.topk(p_keep + mask, kept_length, dim=1, sorted=True)``. Here the softmax
    runs in one kernel (elementwise per row, so the same values) and the top-k of each call
    alone (the very call the layer makes, so the same tokens, ties included).

    Returns:
        ``(p_keep (L, B, S), kept (L, B, S) bool)``.
    """
    p_keep = F.softmax(router_logits, dim=-1)[..., 1]
    force = torch.zeros(p_keep.shape[1:], device=p_keep.device)
    force[:, 0] = force[:, 1 + num_visual:] = torch.inf
    seq_len = p_keep.shape[2]
    kept = torch.zeros(p_keep.shape, dtype=torch.bool, device=p_keep.device)
    for one, kept_one, factor in zip(p_keep, kept, router_factors, strict=True):
        kept_length = seq_len - (num_visual - int(num_visual * factor))
        _, index = torch.topk(one + force, kept_length, dim=1, sorted=True)
        kept_one.scatter_(1, index, True)
    return p_keep, kept


def _num_visual(layer: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    """``get_num_patches() * get_num_images_in_input()`` as the layer computes it."""
    patches = getattr(layer, "get_num_patches", None)
    images = getattr(layer, "get_num_images_in_input", None)
    if callable(patches) and callable(images):
        return int(patches()) * int(images())
    given = args[2] if len(args) > 2 else kwargs.get("num_vision")
    if isinstance(given, int):
        return given
    raise RuntimeError("cannot tell the number of visual tokens: the layer has no "
                       "get_num_patches/get_num_images_in_input and the router got no count")


class CogVLAFiLMAdapter:
    """Feeds a :class:`FiLMObserver` from ``.scale`` (gamma) and ``.shift`` (beta) of the
    FiLM blocks at ``sample_layers`` in each encoder (components ``{enc}/layer_{i:02d}``).

    An index an encoder lacks is skipped: the released ``[0, 9, 18, 26]`` samples block 26,
    which SigLIP (27 blocks) has and DINOv2 (24) lacks, so that is expected; it is said
    once, on the writing rank, through ``logging.getLogger("monitor")`` at INFO, and listed
    in meta (``skipped``). Only indices that match no block of any encoder leave the part
    with nothing to do (:attr:`why_nothing`, which the facade warns with). The last block
    of each encoder runs but never receives a gradient (the encoder output is taken from
    block ``len(blocks) - 2``): meta names it, and a sampled one is flagged.
    """

    def __init__(self, observer: FiLMObserver,
                 sample_layers: Sequence[int] = (0, 9, 18, 26)) -> None:
        self.observer = observer
        self.sample_layers = [int(i) for i in sample_layers]
        self.why_nothing: str | None = None
        """Why :meth:`attach` hooked nothing, when it did not (else None)."""

    def attach(self, model: torch.nn.Module) -> int:
        root = unwrap(model)
        hooks, skipped, dead, sampled_dead, encoders = 0, [], {}, [], {}
        for enc in find_encoders(root):
            blocks = film_blocks(enc["module"])
            if not any(b is not None for b in blocks):
                continue
            name = enc["name"]
            encoders[name] = {"attribute": enc["attr"], "class": enc["class"],
                              "identified_by": enc["how"], "blocks": len(blocks)}
            dead[name] = len(blocks) - 1
            for i in self.sample_layers:
                if not 0 <= i < len(blocks) or blocks[i] is None:
                    skipped.append(f"{name}/layer_{i:02d}")
                    continue
                comp = f"{name}/layer_{i:02d}"
                if i == len(blocks) - 1:
                    sampled_dead.append(comp)
                block: Any = blocks[i]
                self.observer.add_components([comp])
                self.observer.hook(block.scale, self._hook(comp, "gamma"), name=f"{comp}.scale")
                self.observer.hook(block.shift, self._hook(comp, "beta"), name=f"{comp}.shift")
                hooks += 2
        depths = ", ".join(f"{n} {e['blocks']}" for n, e in encoders.items())
        if encoders and not hooks:
            self.why_nothing = (f"film_sample_layers {self.sample_layers} match no FiLM block "
                                f"(blocks per encoder: {depths})")
        elif skipped and self.observer.session.world.is_writer:
            log.info("monitor film: film_sample_layers indices an encoder lacks are skipped "
                     "(blocks per encoder: %s): %s", depths, ", ".join(skipped))
        self.observer.describe(
            encoders=encoders, sample_layers=self.sample_layers, skipped=skipped,
            dead_blocks=dead, sampled_dead_blocks=sampled_dead,
            dead_blocks_note="the last block of each encoder runs but gets no gradient (the "
                             "encoder output is taken from block len(blocks) - 2): its "
                             "gamma/beta never change")
        return hooks

    def _hook(self, component: str, kind: str):
        observer = self.observer

        def on_output(module, args, kwargs, output):
            if isinstance(output, torch.Tensor):
                observer.observe(component, **{kind: output})

        return on_output


class CogVLAMoEAdapter:
    """Feeds a :class:`MoERouterObserver` the logits of ``R.aggregation_router.router``.

    Expert i is the i-th feature list entry, ``[featurizer, fused_featurizer]``: expert 0 is
    DINOv2 (``dino_weight``) and expert 1 SigLIP (``siglip_weight``) in the released
    models. ``routing_outcome`` is never read (it is not the weights).
    """

    def __init__(self, observer: MoERouterObserver) -> None:
        self.observer = observer

    @staticmethod
    def expert_names(model: torch.nn.Module) -> list[str]:
        names = [e["name"] for e in find_encoders(unwrap(model))]
        return names if len(names) == 2 else ["dino", "siglip"]

    def attach(self, model: torch.nn.Module) -> int:
        root = unwrap(model)
        router = moe_router_of(root)
        if not isinstance(router, torch.nn.Module):
            self.observer.describe(module=None)
            return 0
        self.observer.hook(router, self._on_logits, name="aggregation_router.router")
        self.observer.describe(module=path_of(root, router), experts=self.observer.experts,
                               expert_order="the aggregation_router call's feature list: "
                                            "[featurizer, fused_featurizer]")
        return 1

    def _on_logits(self, module, args, kwargs, logits) -> None:
        if isinstance(logits, torch.Tensor):
            self.observer.observe_logits(logits)


class CogVLAAggregationAdapter:
    """Feeds an :class:`AggregationObserver` per encoder that has aggregation tokens
    (``R.vision_backbone.vision_aggr_featurizer`` / ``vision_aggr_fused_featurizer``):
    tokens in = the encoder's ``patch_embed`` output length, tokens out = K (the
    aggregation tokens' count), and the last K tokens of the encoder's output."""

    def __init__(self, observer: AggregationObserver) -> None:
        self.observer = observer
        self._tokens_in: dict[str, int] = {}

    def attach(self, model: torch.nn.Module) -> int:
        root = unwrap(model)
        wrapper = aggregation_wrapper_of(root)
        hooks, found = 0, {}
        for enc in find_encoders(root):
            aggr_attr = dict(ENCODER_ATTRS)[enc["attr"]]
            tokens = getattr(wrapper, aggr_attr, None)
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
                continue
            name, vit, k = enc["name"], enc["module"], int(tokens.shape[1])
            self.observer.add_encoders([name])
            patch_embed = getattr(vit, "patch_embed", None)
            if isinstance(patch_embed, torch.nn.Module):
                self.observer.hook(patch_embed, self._in_hook(name), name=f"{name}.patch_embed")
                hooks += 1
            self.observer.hook(vit, self._out_hook(name, k, vit), name=name)
            hooks += 1
            found[name] = {"aggregation_tokens": aggr_attr, "k": k, "class": enc["class"],
                           "identified_by": enc["how"]}
        self.observer.describe(encoders=found)
        return hooks

    def _in_hook(self, name: str):
        def on_patches(module, args, kwargs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 3:
                self._tokens_in[name] = int(output.shape[1])

        return on_patches

    def _out_hook(self, name: str, k: int, vit: torch.nn.Module):
        observer = self.observer

        def on_output(module, args, kwargs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor) or out.dim() != 3:
                return
            tokens_in = self._tokens_in.pop(name, None) or _num_patches(vit)
            if tokens_in is None:
                return
            observer.observe(name, tokens_in, k, int(out.shape[0]), out[:, -k:])

        return on_output


def _num_patches(vit: torch.nn.Module) -> int | None:
    n = getattr(getattr(vit, "patch_embed", None), "num_patches", None)
    return int(n) if isinstance(n, int) else None


__all__ = ["CogVLAAggregationAdapter", "CogVLAFiLMAdapter", "CogVLALfpAdapter",
           "CogVLAMoEAdapter", "find_encoders", "lfp_selection_many"]
