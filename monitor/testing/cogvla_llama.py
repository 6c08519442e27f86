"""Language side of the tiny CogVLA stand-in: a small Llama with CogVLA's LFP layers.

Mirrors transformers 4.40's Llama (the version OpenVLA pins; SDPA attention) as patched by
CogVLA's ``prismatic/models/modeling_llama.py``: ``llama_sdpa_attention_forward`` (a 4D mask is
always built; the action chunk and stop token attend bidirectionally), ``LlamaDecoderLFPLayer``
with ``TokenRouter`` / ``FiLMedTokenRouter``, and ``llama_lfp_model__init__`` (the layer
schedule). No KV cache: the stand-in is for training forwards.

``NUM_ACTIONS_CHUNK`` and ``ACTION_DIM`` are module constants in the real code; here they are
read from ``config.num_actions_chunk`` / ``config.action_dim`` so tests can shrink them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class LlamaConfig:
    """Attribute bag: the LlamaConfig fields the code reads, plus CogVLA's LFP fields."""

    def __init__(self, **kwargs) -> None:
        self.hidden_size, self.intermediate_size = 4096, 11008
        self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads = 32, 32, 32
        self.vocab_size, self.pad_token_id, self.rms_norm_eps = 32064, 32000, 1e-5
        self.rope_theta, self.max_position_embeddings = 10000.0, 2048
        self.attention_dropout, self.initializer_range = 0.0, 0.02
        self.use_cache, self.output_attentions, self.output_hidden_states, self.use_return_dict = (
            False,
            False,
            False,
            True,
        )
        self._attn_implementation = "sdpa"
        self.use_lfp, self.lfp_type, self.lfp_average_factor, self.lfp_enable_film = (
            False,
            "shiftedcos_decay_0.85_0.15",
            0.5,
            False,
        )
        self.num_actions_chunk, self.action_dim = 8, 7
        self.__dict__.update(kwargs)


# ------------------------------------------------------------------------------- masks
def causal_4d_mask(
    attention_mask_2d: torch.Tensor | None, bsz: int, seq: int, dtype, device
) -> torch.Tensor:
    """(bsz, 1, seq, seq): 0 where attended, ``finfo(dtype).min`` above the diagonal and
    on padded keys."""
    min_dtype = torch.finfo(dtype).min
    mask = torch.full((seq, seq), min_dtype, dtype=dtype, device=device).triu(1)
    mask = mask[None, None].expand(bsz, 1, seq, seq).clone()
    if attention_mask_2d is not None:
        mask = mask.masked_fill(attention_mask_2d[:, None, None, :].eq(0), min_dtype)
    return mask


def check_inf_or_nan(x: torch.Tensor, x_name: str) -> None:
    if torch.isnan(x).any():
        raise ValueError(
            f"NaN detected in input tokens, this is not intended to happen.\n{x_name}:{x}"
        )
    if torch.isinf(x).any():
        raise ValueError(
            f"Inf detected in input tokens, this is not intended to happen.\n{x_name}:{x}"
        )


# ----------------------------------------------------------------------------- modules
class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(input_dtype)


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = (
            self.inv_freq[None, :, None].float() @ position_ids[:, None, :].float()
        ).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaSdpaAttention(nn.Module):
    """transformers' LlamaSdpaAttention with CogVLA's ``llama_sdpa_attention_forward``."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.attention_dropout, self.hidden_size = config.attention_dropout, config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.is_causal = True
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(
            self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False
        )
        self.v_proj = nn.Linear(
            self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False
        )
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(self.head_dim, base=config.rope_theta)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        use_cache=False,
        cache_position=None,
        num_vision=None,
    ):
        bsz, q_len, _ = hidden_states.size()
        if attention_mask is None:  # CogVLA: the mask is modified below, so it can not stay None
            attention_mask = causal_4d_mask(
                None, bsz, q_len, hidden_states.dtype, hidden_states.device
            )
        q = (
            self.q_proj(hidden_states)
            .view(bsz, q_len, self.num_heads, self.head_dim)
            .transpose(1, 2)
        )
        k = (
            self.k_proj(hidden_states)
            .view(bsz, q_len, self.num_key_value_heads, self.head_dim)
            .transpose(1, 2)
        )
        v = (
            self.v_proj(hidden_states)
            .view(bsz, q_len, self.num_key_value_heads, self.head_dim)
            .transpose(1, 2)
        )
        cos, sin = self.rotary_emb(v, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(self.num_key_value_groups, dim=1)
        v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        causal_mask = attention_mask[:, :, :, : k.shape[-2]]

        # CATTEN: the action chunk (+ stop token) attends bidirectionally. As in the real loop,
        # ``num_act`` grows by one per SAMPLE (sample i opens N + 1 + i trailing tokens).
        min_dtype = torch.finfo(hidden_states.dtype).min
        num_pad = (causal_mask[:, 0, -1, :] == min_dtype).sum(dim=1)
        num_act = self.config.num_actions_chunk * self.config.action_dim
        new_mask = causal_mask.clone()
        for idx, n_pad in enumerate(num_pad.tolist()):
            num_act += 1  # stop token
            if n_pad == 0:
                new_mask[idx, :, -num_act:, -num_act:] = 0
            else:
                new_mask[idx, :, -(num_act + n_pad) : -n_pad, -(num_act + n_pad) : -n_pad] = 0

        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=new_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=False,
        )
        out = self.o_proj(out.transpose(1, 2).contiguous().view(bsz, q_len, self.hidden_size))
        return out, None, past_key_value


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaSdpaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        use_cache=False,
        cache_position=None,
        **kwargs,
    ):
        residual = hidden_states
        hidden_states, attn_weights, present = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
            cache_position=cache_position,
        )
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return _layer_outputs(hidden_states, attn_weights, present, output_attentions, use_cache)


def _layer_outputs(hidden_states, attn_weights, present, output_attentions, use_cache) -> tuple:
    outputs = (hidden_states,)
    if output_attentions:
        outputs += (attn_weights,)
    if use_cache:
        outputs += (present,)
    return outputs


# ----------------------------------------------------------------------------- LFP
def get_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class TokenRouter(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.router = nn.Linear(config.hidden_size, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(x)  # (B, S, 2)


class FiLMedTokenRouter(nn.Module):
    """Router logits after FiLM-modulating the visual tokens with the mean text hidden state.

    ``scale``/``shift`` here are MLPs (hidden -> hidden/2 -> hidden) on the LLM side; they are
    not the ViT FiLM ``scale``/``shift`` Linears.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.hidden_size, 2)
        self.scale = get_mlp(config.hidden_size, config.hidden_size // 2, config.hidden_size)
        self.shift = get_mlp(config.hidden_size, config.hidden_size // 2, config.hidden_size)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, num_vision: int
    ) -> torch.Tensor:
        if attention_mask is not None:
            num_pad = (attention_mask[:, 0, -1, :] == torch.finfo(x.dtype).min).sum(dim=1).tolist()
        else:
            num_pad = [0] * x.shape[0]
        num_act = self.config.num_actions_chunk * self.config.action_dim + 1  # + stop token
        # text = [proprio, prompt]: after the visual tokens, before actions + stop + padding
        text_hidden = torch.stack(
            [
                cur[1 + num_vision : -(num_act + n_pad)].mean(dim=0)
                for cur, n_pad in zip(x, num_pad)
            ]
        )
        gamma, beta = self.scale(text_hidden), self.shift(text_hidden)  # (B, hidden)
        filmed = x[:, 1 : 1 + num_vision] * (1 + gamma[:, None, :]) + beta[:, None, :]
        return self.router(
            torch.cat([x[:, 0:1], filmed, x[:, 1 + num_vision :]], dim=1)
        )  # (B, S, 2)


class LlamaDecoderLFPLayer(LlamaDecoderLayer):
    """Per-layer visual token pruning: kept visual tokens run the layer, the rest skip it."""

    def __init__(self, config: LlamaConfig, layer_idx: int, ratio: float = 0.5) -> None:
        super().__init__(config, layer_idx)
        self.config, self.layer_idx, self.router_factor = config, layer_idx, ratio
        self.router = FiLMedTokenRouter(config) if config.lfp_enable_film else TokenRouter(config)
        self.get_num_patches = None  # set by PrismaticForConditionalGeneration (bound methods)
        self.get_num_images_in_input = None

    def forward_w_router_weights(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        use_cache=False,
        cache_position=None,
        router_weights=None,
        **kwargs,
    ):
        residual = hidden_states
        hidden_states, attn_weights, present = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
            cache_position=cache_position,
            num_vision=int(
                self.get_num_patches() * self.get_num_images_in_input() * self.router_factor
            ),
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = residual + mlp_out * router_weights.unsqueeze(-1).to(hidden_states.dtype)
        return _layer_outputs(hidden_states, attn_weights, present, output_attentions, use_cache)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        use_cache=False,
        cache_position=None,
        **kwargs,
    ):
        if hidden_states.shape[1] == 1:  # LFP only during prefill
            return super().forward(
                hidden_states,
                attention_mask,
                position_ids,
                past_key_value,
                output_attentions,
                use_cache,
                cache_position,
                **kwargs,
            )
        bs, seq_len, dim = hidden_states.shape
        num_visual_tokens = self.get_num_patches() * self.get_num_images_in_input()
        visual_kept_length = int(num_visual_tokens * self.router_factor)
        kept_length = seq_len - (num_visual_tokens - visual_kept_length)

        if self.config.lfp_enable_film:
            router_weights = self.router(
                self.input_layernorm(hidden_states), attention_mask, num_visual_tokens
            )
        else:
            router_weights = self.router(self.input_layernorm(hidden_states))
        router_logits = F.softmax(router_weights, dim=-1)[:, :, 1]  # p_keep, (B, S)

        # every non-visual token (BOS, proprio, prompt, actions, stop, padding) is forced kept
        force_select_mask = torch.zeros(router_logits.shape, device=router_logits.device)
        force_select_mask[:, 0] = force_select_mask[:, 1 + num_visual_tokens :] = torch.inf
        _, router_indices = torch.topk(
            router_logits + force_select_mask, kept_length, dim=1, sorted=True
        )
        router_indices, _ = torch.sort(router_indices, dim=1)

        kept_router_weights = torch.gather(router_logits, dim=1, index=router_indices)
        kept_tokens = torch.gather(
            hidden_states, dim=1, index=router_indices.unsqueeze(-1).expand(-1, -1, dim)
        )
        # RoPE positions are renumbered 0..kept_length-1 for the kept tokens
        kept_position_ids = torch.arange(0, kept_length).unsqueeze(0).to(kept_tokens.device)
        if attention_mask is not None:
            rows = torch.gather(
                attention_mask, 2, router_indices[:, None, :, None].expand(-1, 1, -1, seq_len)
            )
            kept_attention_mask = torch.gather(
                rows, 3, router_indices[:, None, None, :].expand(-1, 1, kept_length, -1)
            )
        else:
            kept_attention_mask = causal_4d_mask(
                None, bs, kept_length, kept_tokens.dtype, kept_tokens.device
            )

        outputs = self.forward_w_router_weights(
            kept_tokens,
            attention_mask=kept_attention_mask,
            position_ids=kept_position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
            cache_position=cache_position,
            router_weights=kept_router_weights,
            **kwargs,
        )
        hidden_states = hidden_states.scatter(
            dim=1, index=router_indices.unsqueeze(-1).expand(-1, -1, dim), src=outputs[0]
        )
        check_inf_or_nan(hidden_states, "hidden_states")
        return (hidden_states,) + outputs[1:]


def lfp_schedule(config: LlamaConfig) -> tuple[list[int], list[float]]:
    """``llama_lfp_model__init__``: (lfp_target_layers, keep ratio of every layer)."""
    n, avg = config.num_hidden_layers, config.lfp_average_factor
    ratios = [avg for _ in range(n)]
    if match := re.match(r"(\w+)_decay_(\d+\.\d+)_(\d+\.\d+)", config.lfp_type):
        decay, max_ratio, min_ratio = match.group(1), float(match.group(2)), float(match.group(3))
        if decay == "shiftedcos":  # note: the real code hard-codes total_layers=32 here
            ratios = [math.cos(i * math.pi / (32 - 1)) / 2 + avg for i in range(n)]
        elif decay == "shiftedlinear":
            ratios = [(-i / (32 - 1) + 0.5) + avg for i in range(n)]
        else:
            raise KeyError(decay)
        ratios = [max(r, min_ratio) for r in ratios]
        return [i for i in range(n) if ratios[i] <= max_ratio], ratios
    presets = {
        "deep_all": range(2, n),
        "deep_all_wo_last": range(2, n - 1),
        "interleave": range(1, n, 2),
    }
    if config.lfp_type not in presets:
        raise NotImplementedError(f"Unsupported lfp_type: {config.lfp_type}")
    return list(presets[config.lfp_type]), ratios


# ----------------------------------------------------------------------------- model
@dataclass
class CausalLMOutputWithPast:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: tuple | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config, self.padding_idx, self.vocab_size = (
            config,
            config.pad_token_id,
            config.vocab_size,
        )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        if config.use_lfp:
            lfp_target_layers, ratios = lfp_schedule(config)
            config.lfp_target_layers = lfp_target_layers
            self.layers = nn.ModuleList(
                [
                    LlamaDecoderLFPLayer(config, i, ratio=ratios[i])
                    if i in lfp_target_layers
                    else LlamaDecoderLayer(config, i)
                    for i in range(config.num_hidden_layers)
                ]
            )
        else:
            self.layers = nn.ModuleList(
                [LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
            )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False

    def _update_causal_mask(self, attention_mask, input_tensor):
        # SDPA: no mask at all when nothing is padded (the layers then build their own)
        if attention_mask is None or bool(torch.all(attention_mask == 1)):
            return None
        bsz, seq = input_tensor.shape[:2]
        return causal_4d_mask(attention_mask, bsz, seq, input_tensor.dtype, input_tensor.device)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if cache_position is None:
            cache_position = torch.arange(0, inputs_embeds.shape[1], device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        causal_mask = self._update_causal_mask(attention_mask, inputs_embeds)
        hidden_states, all_hidden = inputs_embeds, ()
        for decoder_layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            layer_outputs = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_value=None,
                output_attentions=bool(output_attentions),
                use_cache=False,
                cache_position=cache_position,
            )
            hidden_states = layer_outputs[0]
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, (all_hidden if output_hidden_states else None)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
    ) -> CausalLMOutputWithPast:
        hidden_states, all_hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
        )
        logits = self.lm_head(hidden_states).float()
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous().view(-1, self.config.vocab_size)
            shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels)  # ignore_index=-100
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=all_hidden)
