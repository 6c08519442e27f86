"""Vision side of the tiny CogVLA stand-in: a timm-like ViT and CogVLA's wrappers around it.

Mirrors, at toy widths, timm 0.9's ``VisionTransformer`` (only what the Prismatic backbone
touches), OpenVLA's ``PrismaticVisionBackbone`` (modeling_prismatic.py), OpenVLA-OFT's
``film_vit_wrapper.py`` and CogVLA's ``vit_wrapper_reg.py``. As in the real code, wrapping
swaps the ViT's ``__class__`` and replaces its ``forward`` with an instance attribute: a
partial of ``get_intermediate_layers`` taking the output of block ``len(blocks) - 2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- timm-like ViT
class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = True
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # (B, num_patches, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (
            self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class LayerScale(nn.Module):
    """timm LayerScale after OpenVLA's ``ls_apply_patch`` (``gamma`` renamed ``scale_factor``)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.inplace = False
        self.scale_factor = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), act_layer(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    """timm ``Block``: the halves are reached by name from ``FiLMedVisionTransformerBlock``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        init_values: float | None,
        act_layer: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        ls = (lambda: LayerScale(dim, init_values)) if init_values else nn.Identity
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.ls1, self.drop_path1 = ls(), nn.Identity()
        self.norm2, self.mlp = (
            nn.LayerNorm(dim, eps=1e-6),
            Mlp(dim, int(dim * mlp_ratio), act_layer),
        )
        self.ls2, self.drop_path2 = ls(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class AttentionPoolLatent(nn.Module):
    """SigLIP's MAP head. Never called by the Prismatic backbone (dead parameters, as for real)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, act_layer) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, dim * 2)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.proj, self.proj_drop = nn.Linear(dim, dim), nn.Dropout(0.0)
        self.norm, self.mlp = (
            nn.LayerNorm(dim, eps=1e-6),
            Mlp(dim, int(dim * mlp_ratio), act_layer),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.num_heads, self.head_dim)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), self.k_norm(k), v)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, 1, C)))
        return (x + self.mlp(self.norm(x)))[:, 0]


class VisionTransformer(nn.Module):
    """The subset of timm's VisionTransformer that the Prismatic backbone and CogVLA use."""

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        class_token: bool,
        reg_tokens: int,
        no_embed_class: bool,
        init_values: float | None,
        global_pool: str,
        act_layer: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        self.num_classes, self.global_pool = 0, global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_reg_tokens, self.has_class_token = reg_tokens, class_token
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.no_embed_class, self.dynamic_img_size, self.grad_checkpointing = (
            no_embed_class,
            False,
            False,
        )
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        )
        embed_len = n if no_embed_class else n + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
        self.pos_drop, self.patch_drop, self.norm_pre = (
            nn.Dropout(0.0),
            nn.Identity(),
            nn.Identity(),
        )
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, init_values, act_layer) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn_pool = (
            AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, act_layer)
            if global_pool == "map"
            else None
        )
        self.fc_norm, self.head_drop, self.head = nn.Identity(), nn.Dropout(0.0), nn.Identity()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        prefix = [
            t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None
        ]
        if self.no_embed_class:  # DINOv2-reg: position embedding on patches only, prefix in front
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.pos_drop(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # replaced per instance by Prismatic
        x = self.norm(self.blocks(self._embed(x)))
        return self.head(
            self.head_drop(self.fc_norm(self.attn_pool(x) if self.attn_pool else x[:, 0]))
        )

    def _intermediate_layers(self, x: torch.Tensor, n: int | Sequence = 1) -> list[torch.Tensor]:
        return _run_blocks(self, x, n, lambda blk, h: blk(h), None)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
    ):
        return _finish(
            self, self._intermediate_layers(x, n), x, False, reshape, return_prefix_tokens, norm
        )


def _run_blocks(vit, x, n, call_block, vision_aggr):
    """timm ``_intermediate_layers``: runs EVERY block, keeps the outputs of the taken ones."""
    outputs, num_blocks = [], len(vit.blocks)
    take = set(range(num_blocks - n, num_blocks) if isinstance(n, int) else n)
    x = vit._embed(x)
    if vision_aggr is not None:  # CogVLA: K learned aggregation tokens appended after the patches
        x = torch.cat([x, vision_aggr.expand(x.shape[0], -1, -1).to(x.dtype).to(x.device)], dim=1)
    for i, blk in enumerate(vit.blocks):
        x = call_block(blk, x)
        if i in take:
            outputs.append(x)
    return outputs


def _finish(vit, outputs, x, aggr: bool, reshape, return_prefix_tokens, norm):
    """timm ``get_intermediate_layers`` tail; with ``aggr`` only the aggregation tokens stay."""
    if norm:
        outputs = [vit.norm(out) for out in outputs]
    prefix_tokens = [out[:, 0 : vit.num_prefix_tokens] for out in outputs]
    outputs = [out[:, vit.num_prefix_tokens :] for out in outputs]
    if aggr:
        outputs = [out[:, vit.patch_embed.num_patches :] for out in outputs]
    if reshape:
        gh, gw = vit.patch_embed.grid_size
        outputs = [
            out.reshape(x.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous() for out in outputs
        ]
    return tuple(zip(outputs, prefix_tokens)) if return_prefix_tokens else tuple(outputs)


def unpack_tuple(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        return result[0] if isinstance(result, tuple) else result

    return wrapper


# --------------------------------------------------------------- FiLM (film_vit_wrapper.py)
class FiLMedVisionTransformerBlock(nn.Module):
    """x + attn half, then x * (1 + gamma) + beta, then + mlp half (gamma, beta from avg_lang)."""

    def __init__(self, block: nn.Module, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.block = block
        self.scale = nn.Linear(llm_dim, vision_dim)
        self.shift = nn.Linear(llm_dim, vision_dim)

    def forward(self, x: torch.Tensor, average_language_embedding: torch.Tensor) -> torch.Tensor:
        gamma = self.scale(average_language_embedding)  # (B, vision_dim), called first
        beta = self.shift(average_language_embedding)  # (B, vision_dim)
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        x = x * (1 + gamma.view(gamma.shape[0], 1, gamma.shape[1])) + beta.view(
            beta.shape[0], 1, beta.shape[1]
        )
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


class NullVisionTransformerBlockWrapper(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x, average_language_embedding):
        return self.block(x)


class FiLMedVisionTransformer(VisionTransformer):
    """FiLM only (no aggregation tokens): output is the 256 patch tokens of block L-2."""

    def _intermediate_layers(self, x, language_embeddings, n=1):
        return _run_blocks(self, x, n, lambda blk, h: blk(h, language_embeddings), None)

    def get_intermediate_layers(
        self, x, language_embeddings, n=1, reshape=False, return_prefix_tokens=False, norm=False
    ):
        outs = self._intermediate_layers(x, language_embeddings, n)
        return _finish(self, outs, x, False, reshape, return_prefix_tokens, norm)


# ------------------------------------------------------ aggregation tokens (vit_wrapper_reg.py)
class FiLMedVisionTransformerAggregator(VisionTransformer):
    """FiLM + aggregation tokens: output is ONLY the K aggregation tokens of block L-2
    (``vit_wrapper_reg.py``; the class both the official CogVLA repository and the public
    fork set with ``vit.__class__ = ...``)."""

    def _intermediate_layers(self, x, language_embeddings, vision_aggr, n=1):
        return _run_blocks(self, x, n, lambda blk, h: blk(h, language_embeddings), vision_aggr)

    def get_intermediate_layers(
        self,
        x,
        language_embeddings,
        vision_aggr,
        n=1,
        reshape=False,
        return_prefix_tokens=False,
        norm=False,
    ):
        outs = self._intermediate_layers(
            x, language_embeddings=language_embeddings, vision_aggr=vision_aggr, n=n
        )
        return _finish(self, outs, x, True, reshape, return_prefix_tokens, norm)


class VisionTransformerAggregator(VisionTransformer):
    """Aggregation tokens without FiLM (blocks are ``NullVisionTransformerBlockWrapper``)."""

    def _intermediate_layers(self, x, vision_aggr, n=1):
        return _run_blocks(self, x, n, lambda blk, h: blk(h, None), vision_aggr)

    def get_intermediate_layers(
        self, x, vision_aggr, n=1, reshape=False, return_prefix_tokens=False, norm=False
    ):
        outs = self._intermediate_layers(x, vision_aggr=vision_aggr, n=n)
        return _finish(self, outs, x, True, reshape, return_prefix_tokens, norm)


# Earlier names of this stand-in (a third-party copy's): kept as aliases of the real classes.
FiLMedVisionTransformerRegister = FiLMedVisionTransformerAggregator
VisionTransformerRegister = VisionTransformerAggregator


# ---------------------------------------------------- Prismatic backbone (modeling_prismatic.py)
def create_tiny_vit(
    model_id: str, img_size: int, act_layer: str | None, specs: dict[str, dict]
) -> VisionTransformer:
    """Stand-in for ``timm.create_model(model_id, num_classes=0, img_size=...)``."""
    spec = dict(specs[model_id])
    siglip = "siglip" in model_id
    act = (lambda: nn.GELU(approximate="tanh")) if siglip else nn.GELU
    return VisionTransformer(
        img_size=img_size,
        act_layer=act,
        global_pool="map" if siglip else "token",
        class_token=not siglip,
        no_embed_class=not siglip,
        **spec,
    )


class PrismaticVisionBackbone(nn.Module):
    """``featurizer`` from timm_model_ids[0] (DINOv2), ``fused_featurizer`` from [1] (SigLIP)."""

    def __init__(
        self,
        use_fused_vision_backbone: bool,
        image_sizes: list[int],
        timm_model_ids: list[str],
        timm_override_act_layers: list[str | None],
        vit_specs: dict[str, dict],
    ) -> None:
        super().__init__()
        self.use_fused_vision_backbone = use_fused_vision_backbone
        self.num_images_in_input = 1
        self.featurizer = self._create_featurizer(
            timm_model_ids[0], image_sizes[0], timm_override_act_layers[0], vit_specs
        )
        self.embed_dim = self.featurizer.embed_dim
        if use_fused_vision_backbone:
            self.fused_featurizer = self._create_featurizer(
                timm_model_ids[1], image_sizes[1], timm_override_act_layers[1], vit_specs
            )
            self.embed_dim += self.fused_featurizer.embed_dim

    @staticmethod
    def _create_featurizer(model_id, img_size, act_layer, vit_specs) -> nn.Module:
        featurizer = create_tiny_vit(model_id, img_size, act_layer, vit_specs)
        num_blocks = len(featurizer.blocks)
        featurizer.forward = unpack_tuple(
            partial(featurizer.get_intermediate_layers, n={num_blocks - 2})
        )
        return featurizer

    def get_num_patches(self) -> int:
        return self.featurizer.patch_embed.num_patches

    def get_num_images_in_input(self) -> int:
        return self.num_images_in_input

    def set_num_images_in_input(self, num_images_in_input: int) -> None:
        self.num_images_in_input = num_images_in_input

    def forward(self, pixel_values: torch.Tensor):
        return _split_and_featurize(self, pixel_values, ())


def _split_and_featurize(vb: PrismaticVisionBackbone, pixel_values: torch.Tensor, extra: tuple):
    """The image loop all backbones share: per image (6 channels), the first 3 channels go to
    ``featurizer`` (DINOv2), then the next 3 to ``fused_featurizer`` (SigLIP)."""
    if vb.get_num_images_in_input() == 1:
        if not vb.use_fused_vision_backbone:
            return vb.featurizer(pixel_values, *extra)
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        return (vb.featurizer(img, *extra), vb.fused_featurizer(img_fused, *extra))
    assert vb.use_fused_vision_backbone, "Multi-image inputs require using fused backbone!"
    all_patches = []
    for img in torch.split(pixel_values, [6] * vb.get_num_images_in_input(), dim=1):
        img_regular, img_fused = torch.split(img, [3, 3], dim=1)
        patches = vb.featurizer(img_regular, *extra)
        patches_fused = vb.fused_featurizer(img_fused, *extra)
        all_patches.append((patches, patches_fused))
    return all_patches


class _WrapperBase(nn.Module):
    def get_num_images_in_input(self) -> int:
        return self.vision_backbone.get_num_images_in_input()

    def set_num_images_in_input(self, num_images_in_input: int) -> None:
        self.vision_backbone.set_num_images_in_input(num_images_in_input)


class FiLMedPrismaticVisionBackbone(_WrapperBase):
    """FiLM without aggregation tokens (film_vit_wrapper.py)."""

    def __init__(self, vision_backbone: PrismaticVisionBackbone, llm_dim: int = 4096) -> None:
        super().__init__()
        self.vision_backbone, self.llm_dim = vision_backbone, llm_dim
        self._wrap_vit(self.vision_backbone.featurizer)
        if self.vision_backbone.use_fused_vision_backbone:
            self._wrap_vit(self.vision_backbone.fused_featurizer)

    def _wrap_vit(self, vit) -> None:
        vit.blocks = nn.Sequential(
            *[FiLMedVisionTransformerBlock(b, vit.num_features, self.llm_dim) for b in vit.blocks]
        )
        vit.__class__ = FiLMedVisionTransformer
        vit.forward = unpack_tuple(partial(vit.get_intermediate_layers, n={len(vit.blocks) - 2}))

    def get_num_patches(self) -> int:
        return self.vision_backbone.get_num_patches()

    def forward(self, pixel_values: torch.Tensor, language_embeddings: torch.Tensor):
        average_language_embedding = language_embeddings.mean(dim=1)
        return _split_and_featurize(
            self.vision_backbone, pixel_values, (average_language_embedding,)
        )


class FiLMedPrismaticVisionBackboneAggregator(_WrapperBase):
    """FiLM + K aggregation tokens per encoder (vit_wrapper_reg.py): the released recipes."""

    def __init__(
        self,
        vision_backbone: PrismaticVisionBackbone,
        llm_dim: int = 4096,
        num_vision_aggr: int = 32,
    ) -> None:
        super().__init__()
        self.vision_backbone, self.llm_dim, self.num_vision_aggr = (
            vision_backbone,
            llm_dim,
            num_vision_aggr,
        )
        self.vision_aggr_featurizer = nn.Parameter(
            torch.randn(1, num_vision_aggr, vision_backbone.featurizer.embed_dim)
        )
        self._wrap_vit(self.vision_backbone.featurizer, self.vision_aggr_featurizer)
        if self.vision_backbone.use_fused_vision_backbone:
            self.vision_aggr_fused_featurizer = nn.Parameter(
                torch.randn(1, num_vision_aggr, vision_backbone.fused_featurizer.embed_dim)
            )
            self._wrap_vit(
                self.vision_backbone.fused_featurizer, self.vision_aggr_fused_featurizer
            )

    def _wrap_vit(self, vit, vision_aggr) -> None:
        vit.blocks = nn.Sequential(
            *[FiLMedVisionTransformerBlock(b, vit.num_features, self.llm_dim) for b in vit.blocks]
        )
        vit.__class__ = FiLMedVisionTransformerAggregator
        vit.forward = unpack_tuple(
            partial(vit.get_intermediate_layers, vision_aggr=vision_aggr, n={len(vit.blocks) - 2})
        )

    def get_num_patches(self) -> int:
        return self.num_vision_aggr  # K tokens out per encoder, not the 256 patches in

    def forward(self, pixel_values: torch.Tensor, language_embeddings: torch.Tensor):
        average_language_embedding = language_embeddings.mean(
            dim=1
        )  # (B, llm_dim), one tensor for all blocks
        return _split_and_featurize(
            self.vision_backbone, pixel_values, (average_language_embedding,)
        )


class PrismaticVisionBackboneAggregator(FiLMedPrismaticVisionBackboneAggregator):
    """Aggregation tokens without FiLM."""

    def _wrap_vit(self, vit, vision_aggr) -> None:
        vit.blocks = nn.Sequential(*[NullVisionTransformerBlockWrapper(b) for b in vit.blocks])
        vit.__class__ = VisionTransformerAggregator
        vit.forward = unpack_tuple(
            partial(vit.get_intermediate_layers, vision_aggr=vision_aggr, n={len(vit.blocks) - 2})
        )

    def forward(self, pixel_values: torch.Tensor):
        return _split_and_featurize(self.vision_backbone, pixel_values, ())
