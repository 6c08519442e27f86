"""Tiny CogVLA stand-in: top-level model, MoE aggregator, projectors, config and batch helpers.

Mirrors ``prismatic/extern/hf/modeling_prismatic.py`` (CogVLA's version, ``vision_aggregate_type
== 'moe'``), ``prismatic/models/router.py`` (``MoEAggregator``) and the model set-up of
``vla-scripts/finetune.py`` (vision wrapper swapped in after loading, two images per sample).
Same class names, attribute paths, call order and shapes as the real model; toy widths.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from monitor.testing.cogvla_llama import LlamaConfig, LlamaForCausalLM
from monitor.testing.cogvla_vision import (
    FiLMedPrismaticVisionBackbone,
    FiLMedPrismaticVisionBackboneAggregator,
    PrismaticVisionBackbone,
    PrismaticVisionBackboneAggregator,
)

IGNORE_INDEX = -100
STOP_INDEX = 2  # '</s>'
BOS_INDEX = 1
DINOV2_TIMM_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_TIMM_ID = "vit_so400m_patch14_siglip_224"


@dataclass
class TinyCogVLAConfig:
    """Every size of the stand-in. Real values in comments (LIBERO recipe)."""

    num_vision_aggr: int = 8  # K, aggregation tokens per encoder per image (64)
    num_images_in_input: int = 2  # (2)
    image_size: int = 32  # 224; with patch 2 the grid is 16x16 = 256 patches, as for real
    patch_size: int = 2  # 14
    dino_width: int = 32  # 1024
    dino_depth: int = 24  # 24
    dino_reg_tokens: int = 4  # 4 (+ CLS = 5 prefix tokens)
    dino_layer_scale: float = 0.1  # LayerScale init (pretrained values vary)
    siglip_width: int = 48  # 1152
    siglip_depth: int = 27  # 27
    vit_heads: int = 2  # 16
    vit_mlp_ratio: float = 2.0  # 4 / 3.7362
    hidden_size: int = 64  # 4096
    intermediate_size: int = 128  # 11008
    num_hidden_layers: int = 32  # 32
    num_attention_heads: int = 4  # 32
    base_vocab_size: int = 96  # 32000 (pad token id = base_vocab_size)
    pad_to_multiple_of: int = 32  # 64
    n_action_bins: int = 32  # 256
    num_actions_chunk: int = 2  # NUM_ACTIONS_CHUNK (8)
    action_dim: int = 3  # ACTION_DIM (7)
    proprio_dim: int = 4  # PROPRIO_DIM (8)
    prompt_len: int = 6  # prompt tokens after BOS
    use_film: bool = True
    use_aggr: bool = True
    use_lfp: bool = True
    lfp_enable_film: bool = True
    lfp_type: str = "shiftedcos_decay_0.85_0.15"
    lfp_average_factor: float = 0.5
    timm_model_ids: list[str] = field(default_factory=lambda: [DINOV2_TIMM_ID, SIGLIP_TIMM_ID])

    @property
    def vocab_size(self) -> int:
        m = self.pad_to_multiple_of
        return ((self.base_vocab_size + 1 + m - 1) // m) * m

    @property
    def action_token_begin_idx(self) -> int:  # 31743 for real: action ids are > this
        return self.base_vocab_size - self.n_action_bins - 1

    @property
    def num_action_tokens(self) -> int:
        return self.num_actions_chunk * self.action_dim

    @property
    def num_visual_tokens(self) -> int:
        per_image = (
            self.num_vision_aggr if self.use_aggr else (self.image_size // self.patch_size) ** 2
        )
        return per_image * self.num_images_in_input


class PrismaticConfig:
    """Attribute bag with the fields of the real PrismaticConfig that the model reads."""

    def __init__(self, tiny: TinyCogVLAConfig) -> None:
        self.vision_backbone_id, self.llm_backbone_id = "dinosiglip-vit-so-224px", "llama2-7b-pure"
        self.use_fused_vision_backbone = True
        self.timm_model_ids = list(tiny.timm_model_ids)
        self.timm_override_act_layers = [None, None]
        self.image_sizes = [tiny.image_size, tiny.image_size]
        self.pad_token_id, self.pad_to_multiple_of = tiny.base_vocab_size, tiny.pad_to_multiple_of
        self.output_attentions = self.output_hidden_states = False
        self.use_return_dict = True
        self.text_config = LlamaConfig(
            hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_hidden_layers,
            num_attention_heads=tiny.num_attention_heads,
            num_key_value_heads=tiny.num_attention_heads,
            vocab_size=tiny.vocab_size,
            pad_token_id=tiny.base_vocab_size,
            use_lfp=tiny.use_lfp,
            lfp_type=tiny.lfp_type,
            lfp_average_factor=tiny.lfp_average_factor,
            lfp_enable_film=tiny.lfp_enable_film,
            num_actions_chunk=tiny.num_actions_chunk,
            action_dim=tiny.action_dim,
        )
        common = {
            "patch_size": tiny.patch_size,
            "num_heads": tiny.vit_heads,
            "mlp_ratio": tiny.vit_mlp_ratio,
        }
        self.vit_specs = {  # stand-in for timm's registry
            tiny.timm_model_ids[0]: dict(
                common,
                embed_dim=tiny.dino_width,
                depth=tiny.dino_depth,
                reg_tokens=tiny.dino_reg_tokens,
                init_values=tiny.dino_layer_scale,
            ),
            tiny.timm_model_ids[1]: dict(
                common,
                embed_dim=tiny.siglip_width,
                depth=tiny.siglip_depth,
                reg_tokens=0,
                init_values=None,
            ),
        }
        self.tiny = tiny


class OpenVLAConfig(PrismaticConfig):
    def __init__(self, tiny: TinyCogVLAConfig) -> None:
        super().__init__(tiny)
        self.norm_stats, self.n_action_bins = None, tiny.n_action_bins
        self.vision_aggregate_type, self.num_vision_aggr = "moe", tiny.num_vision_aggr
        self.use_aggr, self.use_film = tiny.use_aggr, tiny.use_film


# ----------------------------------------------------------------------------- modules
class MoEAggregator(nn.Module):
    """CogVLA's dense 2-expert fusion: weights = softmax(router(avg_lang)), one pair per sample."""

    def __init__(
        self,
        num_experts: int = 2,
        seq_dim: int = 256,
        router_method: Literal["mlp", "add"] = "mlp",
    ) -> None:
        super().__init__()
        self.num_experts, self.router_method = num_experts, router_method
        self.routing_outcome = None
        if router_method == "mlp":
            self.router = nn.Sequential(
                nn.Linear(seq_dim, seq_dim), nn.GELU(), nn.Linear(seq_dim, num_experts)
            )
        else:
            assert router_method == "add", f"router_method({router_method}) not supported"

    def forward(self, inputs_embeds: list[torch.Tensor], seq_embeds: torch.Tensor) -> torch.Tensor:
        hidden_states = torch.zeros_like(inputs_embeds[0])
        bs = inputs_embeds[0].shape[0]
        self.routing_outcome = []
        if self.router_method == "add":
            ratios = torch.ones(bs, len(inputs_embeds), device=inputs_embeds[0].device)
        else:
            ratios = torch.softmax(self.router(seq_embeds), dim=-1)  # (B, num_experts)
        for i in range(self.num_experts):
            weighted = ratios[:, i].view(-1, 1, 1) * inputs_embeds[i]
            hidden_states += weighted
            # mean |weighted contribution| per sample: NOT the weights, and not detached
            self.routing_outcome.append(weighted.abs().mean(dim=-1).mean(dim=-1))
        self.routing_outcome = torch.stack(self.routing_outcome, dim=1)
        return hidden_states


class PrismaticProjector(nn.Module):
    def __init__(self, use_fused_vision_backbone: bool, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.use_fused_vision_backbone, self.vision_dim, self.llm_dim = (
            use_fused_vision_backbone,
            vision_dim,
            llm_dim,
        )
        if not use_fused_vision_backbone:
            self.fc1, self.fc2, self.act_fn1 = (
                nn.Linear(vision_dim, llm_dim),
                nn.Linear(llm_dim, llm_dim),
                nn.GELU(),
            )
        else:
            self.fc1, self.fc2 = (
                nn.Linear(vision_dim, 4 * vision_dim),
                nn.Linear(4 * vision_dim, llm_dim),
            )
            self.fc3, self.act_fn1, self.act_fn2 = (
                nn.Linear(llm_dim, llm_dim),
                nn.GELU(),
                nn.GELU(),
            )

    def forward(self, img_patches: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act_fn1(self.fc1(img_patches)))
        return self.fc3(self.act_fn2(x)) if self.use_fused_vision_backbone else x


class ProprioProjector(nn.Module):
    """Separate module in training (its own DDP), passed to ``forward(proprio_projector=...)``."""

    def __init__(self, llm_dim: int, proprio_dim: int) -> None:
        super().__init__()
        self.llm_dim, self.proprio_dim = llm_dim, proprio_dim
        self.fc1, self.fc2, self.act_fn1 = (
            nn.Linear(proprio_dim, llm_dim),
            nn.Linear(llm_dim, llm_dim),
            nn.GELU(),
        )

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


@dataclass
class PrismaticCausalLMOutputWithPast:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: tuple | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    projector_features: torch.Tensor | None = None


def get_current_action_mask(
    labels: torch.Tensor, action_dim: int, action_token_begin_idx: int
) -> torch.Tensor:
    cumsum = torch.cumsum(labels != IGNORE_INDEX, dim=1)
    return ((1 <= cumsum) & (cumsum <= action_dim)) & (labels > action_token_begin_idx)


def get_next_actions_mask(
    labels: torch.Tensor, action_dim: int, action_token_begin_idx: int
) -> torch.Tensor:
    return (torch.cumsum(labels != IGNORE_INDEX, dim=1) > action_dim) & (
        labels > action_token_begin_idx
    )


# ----------------------------------------------------------------------------- the VLA
class PrismaticPreTrainedModel(nn.Module):
    def _init_weights(self, module: nn.Module) -> None:  # HF post_init: normal(0, 0.02)
        std = self.config.text_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()


class PrismaticForConditionalGeneration(PrismaticPreTrainedModel):
    def __init__(self, config: PrismaticConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_backbone = PrismaticVisionBackbone(
            config.use_fused_vision_backbone,
            config.image_sizes,
            config.timm_model_ids,
            config.timm_override_act_layers,
            config.vit_specs,
        )
        if config.vision_aggregate_type == "moe":
            llm_dim = config.text_config.hidden_size
            self.aggregation_router = MoEAggregator(
                num_experts=2, seq_dim=llm_dim, router_method="mlp"
            )
            self.featurizer_proj = PrismaticProjector(
                False, self.vision_backbone.featurizer.embed_dim, llm_dim
            )
            self.fused_featurizer_proj = PrismaticProjector(
                False, self.vision_backbone.fused_featurizer.embed_dim, llm_dim
            )
        else:
            self.projector = PrismaticProjector(
                True, self.vision_backbone.embed_dim, config.text_config.hidden_size
            )
        # AutoModelForCausalLM.from_config copies text_config; lfp_target_layers lands on the copy
        self.language_model = LlamaForCausalLM(copy.deepcopy(config.text_config))
        for layer in self.language_model.model.layers:
            layer.get_num_patches = self.get_num_patches
            layer.get_num_images_in_input = self.get_num_images_in_input
        self.vocab_size = config.text_config.vocab_size
        self.pad_token_id = config.pad_token_id
        self.llm_dim = config.text_config.hidden_size
        self.apply(self._init_weights)

    def get_num_patches(self) -> int:
        return self.vision_backbone.get_num_patches()

    def get_num_images_in_input(self) -> int:
        return self.vision_backbone.get_num_images_in_input()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def _process_action_masks(self, labels: torch.Tensor) -> torch.Tensor:
        t = self.config.tiny
        args = (t.action_dim, t.action_token_begin_idx)
        return get_current_action_mask(labels, *args) | get_next_actions_mask(labels, *args)

    def _aggregate_patch_features(self, patch_features, language_embeddings=None):
        if self.config.vision_aggregate_type == "moe":
            average_language_embedding = language_embeddings.mean(dim=1)
            patches, patches_fused = patch_features  # (DINOv2, SigLIP)
            return self.aggregation_router(
                [self.featurizer_proj(patches), self.fused_featurizer_proj(patches_fused)],
                average_language_embedding,
            )
        return self.projector(torch.cat(patch_features, dim=2))

    def _process_vision_features(self, pixel_values, language_embeddings=None):
        if isinstance(
            self.vision_backbone,
            (FiLMedPrismaticVisionBackboneAggregator, FiLMedPrismaticVisionBackbone),
        ):
            # every ViT call (image1 DINOv2, image1 SigLIP, image2 ...) happens here, first
            patch_features = self.vision_backbone(pixel_values, language_embeddings)
        else:
            patch_features = self.vision_backbone(pixel_values)
        if self.vision_backbone.get_num_images_in_input() == 1:
            return self._aggregate_patch_features(patch_features, language_embeddings)
        return torch.cat(
            [self._aggregate_patch_features(f, language_embeddings) for f in patch_features], dim=1
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        labels=None,
        inputs_embeds=None,
        past_key_values=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        output_projector_features=None,
        return_dict=None,
        proprio=None,
        proprio_projector=None,
        noisy_actions=None,
        noisy_action_projector=None,
        diffusion_timestep_embeddings=None,
    ):
        if noisy_actions is not None:
            raise NotImplementedError("the stand-in has no diffusion path")
        if pixel_values is None:
            out = self.language_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
            return PrismaticCausalLMOutputWithPast(
                loss=out.loss, logits=out.logits, hidden_states=out.hidden_states
            )

        input_embeddings = self.get_input_embeddings()(input_ids)  # (B, S, D)
        all_actions_mask = self._process_action_masks(labels)
        # "language" = every non-action token: BOS, prompt, stop token AND right padding
        language_embeddings = input_embeddings[~all_actions_mask].reshape(
            input_embeddings.shape[0], -1, input_embeddings.shape[2]
        )
        projected_patch_embeddings = self._process_vision_features(
            pixel_values, language_embeddings
        )
        if proprio_projector is not None and proprio is not None:
            proprio = proprio.reshape(projected_patch_embeddings.shape[0], -1)
            proprio_features = proprio_projector(proprio).unsqueeze(dim=1)
            projected_patch_embeddings = torch.cat(
                (projected_patch_embeddings, proprio_features), dim=1
            )
        if diffusion_timestep_embeddings is not None:
            projected_patch_embeddings = torch.cat(
                (projected_patch_embeddings, diffusion_timestep_embeddings), dim=1
            )
        # the action tokens enter the LLM as zero vectors (L1-regression / CE path)
        input_embeddings = input_embeddings * ~all_actions_mask.unsqueeze(-1)

        n_new = projected_patch_embeddings.shape[1]
        multimodal_embeddings = torch.cat(
            [input_embeddings[:, :1], projected_patch_embeddings, input_embeddings[:, 1:]], dim=1
        )
        multimodal_attention_mask = None
        if attention_mask is not None:
            ones = torch.ones(
                (attention_mask.shape[0], n_new),
                dtype=attention_mask.dtype,
                device=attention_mask.device,
            )
            multimodal_attention_mask = torch.cat(
                [attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1
            )
        multimodal_labels = None
        if labels is not None:
            ignore = torch.full(
                (labels.shape[0], n_new), IGNORE_INDEX, dtype=labels.dtype, device=labels.device
            )
            multimodal_labels = torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)

        out = self.language_model(
            input_ids=None,
            attention_mask=multimodal_attention_mask,
            inputs_embeds=multimodal_embeddings,
            labels=multimodal_labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return PrismaticCausalLMOutputWithPast(
            loss=out.loss,
            logits=out.logits,
            hidden_states=out.hidden_states,
            projector_features=projected_patch_embeddings,
        )


class OpenVLAForActionPrediction(PrismaticForConditionalGeneration):
    """What training instantiates (``AutoModelForVision2Seq`` -> this class)."""

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__(config)
        self.norm_stats = config.norm_stats
        self.bins = np.linspace(-1, 1, config.n_action_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        self.vocab_size = config.text_config.vocab_size - config.pad_to_multiple_of


# ----------------------------------------------------------------------------- helpers
def build_tiny_cogvla(
    config: TinyCogVLAConfig | None = None, seed: int = 0
) -> OpenVLAForActionPrediction:
    """Build the stand-in the way finetune.py builds the real one: load the VLA, set the number
    of images, then swap ``vla.vision_backbone`` for the FiLM/aggregation wrapper. Seeded with a
    forked RNG (the global RNG state is left untouched)."""
    tiny = config or TinyCogVLAConfig()
    if tiny.use_aggr and not tiny.use_film:
        # PrismaticVisionBackboneAggregator subclasses the FiLM aggregator, so the real
        # _process_vision_features isinstance check passes language embeddings to a
        # forward(pixel_values) and raises TypeError: the released code cannot run this.
        raise ValueError("use_aggr without use_film does not run in the real CogVLA code")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vla = OpenVLAForActionPrediction(OpenVLAConfig(tiny))
        vla.vision_backbone.set_num_images_in_input(tiny.num_images_in_input)
        if tiny.use_aggr:
            wrapper = (
                FiLMedPrismaticVisionBackboneAggregator
                if tiny.use_film
                else PrismaticVisionBackboneAggregator
            )
            vla.vision_backbone = wrapper(
                vision_backbone=vla.vision_backbone,
                llm_dim=vla.llm_dim,
                num_vision_aggr=tiny.num_vision_aggr,
            )
        elif tiny.use_film:
            vla.vision_backbone = FiLMedPrismaticVisionBackbone(
                vision_backbone=vla.vision_backbone, llm_dim=vla.llm_dim
            )
    return vla


def build_proprio_projector(
    config: TinyCogVLAConfig | None = None, seed: int = 0
) -> ProprioProjector:
    tiny = config or TinyCogVLAConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return ProprioProjector(llm_dim=tiny.hidden_size, proprio_dim=tiny.proprio_dim)


def task_prompt(config: TinyCogVLAConfig, task: int) -> torch.Tensor:
    """The instruction tokens of task ``task`` (fixed: drawn from a generator seeded by it)."""
    g = torch.Generator().manual_seed(7919 * (int(task) + 1))
    return torch.randint(3, config.action_token_begin_idx + 1, (config.prompt_len,), generator=g)


def synthetic_batch(
    config: TinyCogVLAConfig | None = None,
    batch_size: int = 2,
    generator: torch.Generator | None = None,
    *,
    pad_tokens: int = 0,
    proprio_projector: nn.Module | None = None,
    tasks=None,
) -> dict[str, object]:
    """Forward kwargs for one step, laid out like OpenVLA's right-padded collator:
    input_ids = [BOS, prompt, action tokens, stop, padding]; the LLM sees
    [BOS, visual (K * images), proprio (if a projector is given), prompt, actions, stop, padding].

    ``tasks`` (one int per sample, a list or a tensor): sample ``b`` gets task ``tasks[b]``'s
    instruction, a prompt fixed per task (the same tokens in every batch, as a LIBERO task's
    instruction is), instead of random prompt tokens; images and actions stay random. The
    ids are what a script would pass to ``set_groups``.

    Odd-indexed samples get a prompt ``pad_tokens`` shorter and that many right-pad tokens.
    ``attention_mask`` is always a tensor (as from the collator); the LLM turns an all-ones
    mask into None. With ``proprio_projector`` the batch also carries ``proprio`` and the
    projector itself, exactly the kwargs finetune.py passes.
    """
    t = config or TinyCogVLAConfig()
    if pad_tokens >= t.prompt_len:
        raise ValueError("pad_tokens must be smaller than prompt_len")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    seq = 1 + t.prompt_len + t.num_action_tokens + 1
    pad_id = t.base_vocab_size
    input_ids = torch.full((batch_size, seq), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, seq), IGNORE_INDEX, dtype=torch.long)
    task_ids = None if tasks is None else [int(i) for i in tasks]
    if task_ids is not None and len(task_ids) != batch_size:
        raise ValueError(f"tasks must give one task per sample ({batch_size}), got {len(task_ids)}")
    for b in range(batch_size):
        n_pad = pad_tokens if b % 2 == 1 else 0
        if task_ids is None:
            prompt = torch.randint(
                3, t.action_token_begin_idx + 1, (t.prompt_len - n_pad,), generator=g
            )
        else:
            prompt = task_prompt(t, task_ids[b])[: t.prompt_len - n_pad]
        actions = torch.randint(
            t.action_token_begin_idx + 1, t.base_vocab_size, (t.num_action_tokens,), generator=g
        )
        row = torch.cat([torch.tensor([BOS_INDEX]), prompt, actions, torch.tensor([STOP_INDEX])])
        input_ids[b, : row.numel()] = row
        labels[b, row.numel() - t.num_action_tokens - 1 : row.numel()] = row[
            -t.num_action_tokens - 1 :
        ]
    side = t.image_size
    batch: dict[str, object] = {
        "input_ids": input_ids,
        "attention_mask": input_ids.ne(pad_id),
        "pixel_values": torch.randn(
            batch_size, 6 * t.num_images_in_input, side, side, generator=g
        ),
        "labels": labels,
    }
    if proprio_projector is not None:
        batch["proprio"] = torch.randn(batch_size, t.proprio_dim, generator=g)
        batch["proprio_projector"] = proprio_projector
    return batch
