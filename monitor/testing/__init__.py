"""A tiny CogVLA stand-in, for trying the monitor and for tests. It is NOT the real model.

CogVLA (OpenVLA-OFT + FiLM, aggregation tokens, MoE fusion and LFP token routing) is a 7B
model that needs weights, a GPU, timm and transformers. This package rebuilds its structure
at toy widths with torch only: the same class names, attribute paths
(``vision_backbone.vision_backbone.featurizer.blocks[i].scale``, ``aggregation_router.router``,
``language_model.model.layers[l].router``, ...), call signatures, call order and output
shapes, so that hooks a monitor registers on the stand-in see what they would see on the
real model. Depths are real (24/27 ViT blocks, 32 LLM layers, LFP on 8..31); widths, the
number of aggregation tokens K, the image size and the action chunk are small.

    from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch

    cfg = TinyCogVLAConfig()
    vla = build_tiny_cogvla(cfg, seed=0)
    out = vla(**synthetic_batch(cfg, batch_size=2, generator=torch.Generator().manual_seed(0)))
    out.loss.backward()   # LM cross-entropy on the action + stop tokens, as the real forward
"""

from monitor.testing.cogvla_llama import (
    FiLMedTokenRouter,
    LlamaConfig,
    LlamaDecoderLayer,
    LlamaDecoderLFPLayer,
    LlamaForCausalLM,
    LlamaModel,
    TokenRouter,
    lfp_schedule,
)
from monitor.testing.cogvla_model import (
    DINOV2_TIMM_ID,
    IGNORE_INDEX,
    SIGLIP_TIMM_ID,
    STOP_INDEX,
    MoEAggregator,
    OpenVLAConfig,
    OpenVLAForActionPrediction,
    PrismaticCausalLMOutputWithPast,
    PrismaticConfig,
    PrismaticForConditionalGeneration,
    PrismaticProjector,
    ProprioProjector,
    TinyCogVLAConfig,
    build_proprio_projector,
    build_tiny_cogvla,
    synthetic_batch,
)
from monitor.testing.cogvla_vision import (
    FiLMedPrismaticVisionBackbone,
    FiLMedPrismaticVisionBackboneAggregator,
    FiLMedVisionTransformer,
    FiLMedVisionTransformerAggregator,
    FiLMedVisionTransformerBlock,
    FiLMedVisionTransformerRegister,
    PrismaticVisionBackbone,
    PrismaticVisionBackboneAggregator,
    VisionTransformer,
    VisionTransformerAggregator,
    VisionTransformerRegister,
)

__all__ = [
    "DINOV2_TIMM_ID",
    "IGNORE_INDEX",
    "SIGLIP_TIMM_ID",
    "STOP_INDEX",
    "FiLMedPrismaticVisionBackbone",
    "FiLMedPrismaticVisionBackboneAggregator",
    "FiLMedTokenRouter",
    "FiLMedVisionTransformer",
    "FiLMedVisionTransformerAggregator",
    "FiLMedVisionTransformerBlock",
    "FiLMedVisionTransformerRegister",
    "LlamaConfig",
    "LlamaDecoderLFPLayer",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaModel",
    "MoEAggregator",
    "OpenVLAConfig",
    "OpenVLAForActionPrediction",
    "PrismaticCausalLMOutputWithPast",
    "PrismaticConfig",
    "PrismaticForConditionalGeneration",
    "PrismaticProjector",
    "PrismaticVisionBackbone",
    "PrismaticVisionBackboneAggregator",
    "ProprioProjector",
    "TinyCogVLAConfig",
    "TokenRouter",
    "VisionTransformer",
    "VisionTransformerAggregator",
    "VisionTransformerRegister",
    "build_proprio_projector",
    "build_tiny_cogvla",
    "lfp_schedule",
    "synthetic_batch",
]
