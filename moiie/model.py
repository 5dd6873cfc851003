"""MoIIEForCausalLM: vision encoder -> projector -> image tokens in the text -> causal LM with FFN slots.

SPEC section 1: image features replace the image placeholder positions of the text embedding;
the chosen decoder layers' FFNs (odd layers by default) become the configured FFN slot, upcycled
from the dense weights (section 6). The loss is the LM loss on answer tokens plus the weighted
per-modality balancing losses (section 5).
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers.utils import ModelOutput

import moiie.backbones  # noqa: F401  (registers the vision encoder and LLM backbone kinds)
from moiie.backbones.llm import LayerChoice, RoutingContext, inject_ffns
from moiie.batch_checks import check_lvlm_batch, check_tensor, is_integer
from moiie.config_base import Config
from moiie.layer import FFNConfig, MoEConfig
from moiie.losses import AuxLossConfig, aux_losses
from moiie.modality import modality_ids
from moiie.processor import IGNORE_INDEX
from moiie.projectors import MLPProjectorConfig
from moiie.registry import LLM_BACKBONES, PROJECTORS, VISION_ENCODERS, Slot
from moiie.routers.base import Routing

VisionConfig = Slot(VISION_ENCODERS)
ProjectorConfig = Slot(PROJECTORS)
LLMConfig = Slot(LLM_BACKBONES)

CONFIG_NAME = "moiie_config.json"
WEIGHTS_NAME = "model.safetensors"


class LVLMConfig(Config):
    """A whole LVLM: which vision encoder, projector and LLM, and what the chosen FFNs become."""

    kind: Literal["lvlm"] = "lvlm"
    vision: VisionConfig
    """Vision encoder; any kind registered in moiie.VISION_ENCODERS."""
    projector: ProjectorConfig = Field(default_factory=MLPProjectorConfig)
    """Vision -> LLM projector (default `mlp` depth 2 GELU = LLaVA's mlp2x_gelu)."""
    llm: LLMConfig
    """Causal LM backbone; any kind registered in moiie.LLM_BACKBONES."""
    ffn: FFNConfig = Field(default_factory=MoEConfig)
    """What the chosen layers' FFNs become (`moe` with a router, or `dense`)."""
    moe_layers: LayerChoice = "odd"
    """Which decoder layers get the FFN slot: odd (paper), even, all, none, or a list of indices."""
    modality_rule: Literal["exact", "official"] = "exact"
    """Which positions route as vision: exactly the image positions, or the official code's rule
    (an image position followed by another one; the last token of each image block routes as text)."""

    @property
    def aux_loss(self) -> AuxLossConfig:
        return getattr(self.ffn, "aux_loss", AuxLossConfig())


@dataclass
class LVLMOutput(ModelOutput):
    """loss = lm_loss + aux_loss; routings: one Routing per FFN-slot layer (None for dense slots)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    routings: list[Routing | None] | None = None
    modality: torch.Tensor | None = None
    past_key_values: Any = None


class MoIIEForCausalLM(nn.Module):
    """The LVLM. Build with :meth:`from_config`; save/load with :meth:`save_pretrained` / :meth:`from_pretrained`.

    ``moiie_config`` is the :class:`LVLMConfig` it was built from; ``config`` is the LLM's HF config.
    """

    def __init__(self, *, config: LVLMConfig, vision: nn.Module, projector: nn.Module, llm: nn.Module):
        super().__init__()
        self.moiie_config = config
        self.vision, self.projector, self.llm = vision, projector, llm
        self.context = RoutingContext()
        self.moe_layer_indices = inject_ffns(llm, config.ffn, config.moe_layers, self.context)

    @property
    def _cache_arg(self) -> str:
        """Name of the KV-cache argument and output field (`cache` in newer transformers, else `past_key_values`)."""
        if not hasattr(self, "_cache_name"):
            params = inspect.signature(self.llm.forward).parameters
            self._cache_name = "cache" if "cache" in params else "past_key_values"
        return self._cache_name

    @classmethod
    def from_config(cls, config: LVLMConfig) -> MoIIEForCausalLM:
        vision = VISION_ENCODERS.build(config.vision)
        llm = LLM_BACKBONES.build(config.llm)
        d_llm = llm.get_input_embeddings().embedding_dim
        projector = PROJECTORS.build(config.projector, d_in=vision.d_vision, d_out=d_llm)
        return cls(config=config, vision=vision, projector=projector.to(llm.dtype), llm=llm)

    @property
    def config(self):
        """The LLM's HF config (what HF tooling such as ``Trainer`` reads and sets); see ``moiie_config``."""
        return self.llm.config

    def upcycle(self, ffn: Config, moe_layers: LayerChoice) -> None:
        """Turn the chosen dense FFNs into FFN slots in place (between stage 1 and stage 2, SPEC section 6)."""
        self.moe_layer_indices = inject_ffns(self.llm, ffn, moe_layers, self.context)
        self.moiie_config = self.moiie_config.model_copy(update={"ffn": ffn, "moe_layers": moe_layers})

    @property
    def vocab_size(self) -> int:
        return self.llm.get_input_embeddings().num_embeddings

    @property
    def n_image_tokens(self) -> int:
        return self.vision.n_tokens()

    # ---- forward -------------------------------------------------------------------------------

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_mask: torch.Tensor | None
    ):
        """Text embeddings with image features written into the image positions. -> (B, L, d)."""
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a (batch, seq) integer tensor, got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(
                f"input_ids holds ids in {input_ids.min().item()}..{input_ids.max().item()}, "
                f"outside the vocabulary 0..{self.vocab_size - 1}"
            )
        embeds = self.llm.get_input_embeddings()(input_ids)
        n_slots = 0 if image_mask is None else int(image_mask.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"image_mask marks {n_slots} image positions but no pixel_values were given")
            return embeds
        if image_mask is None or tuple(image_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                "image_mask: a (batch, seq) bool mask of image positions is required with pixel_values"
            )
        n_images = pixel_values.shape[0]
        if n_slots != n_images * self.n_image_tokens:
            raise ValueError(
                f"image_mask marks {n_slots} positions but {n_images} image(s) x {self.n_image_tokens} tokens "
                f"= {n_images * self.n_image_tokens} are needed for the images in pixel_values "
                "(one placeholder per image?)"
            )
        try:
            self.vision.check_pixels(pixel_values)
        except (TypeError, ValueError) as err:
            raise type(err)(f"pixel_values: {err}") from None
        feats = self.projector(self.vision(pixel_values.to(self._vision_dtype())))
        return embeds.masked_scatter(image_mask.bool()[..., None], feats.to(embeds.dtype))

    def _vision_dtype(self) -> torch.dtype:
        p = next(self.vision.parameters(), None)
        return torch.float32 if p is None else p.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: Any = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        **unused: Any,
    ) -> LVLMOutput:
        """input_ids (B, L); attention_mask (B, L) 1 = real; pixel_values (N_img, C, H, W);
        image_mask (B, L) bool; labels (B, L) with -100 where no loss is taken."""
        check_lvlm_batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_mask=image_mask,
            position_ids=position_ids,
        )
        current_mask = attention_mask
        if attention_mask is not None:
            # with a KV cache the mask also covers the cached positions; the last L belong to input_ids
            cached = past_key_values is not None and attention_mask.shape[-1] >= input_ids.shape[-1]
            if attention_mask.shape[0] != input_ids.shape[0] or not (
                cached or attention_mask.shape == input_ids.shape
            ):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)}"
                )
            current_mask = attention_mask[:, -input_ids.shape[-1] :]
        embeds = self.embed(input_ids, pixel_values, image_mask)
        modality = modality_ids(
            image_mask,
            current_mask,
            tuple(input_ids.shape),
            rule=self.moiie_config.modality_rule,
            device=input_ids.device,
        )
        if position_ids is None and attention_mask is not None and past_key_values is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.context.start(modality)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{self._cache_arg: past_key_values},
        )
        routings = self.context.routings()
        aux = aux_losses(routings, self.moiie_config.aux_loss)
        aux_total = aux.pop("total").to(out.logits.device)
        lm_loss = loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(out.logits, labels)
            loss = lm_loss + aux_total
        return LVLMOutput(
            loss=loss,
            logits=out.logits,
            lm_loss=lm_loss,
            aux_loss=aux_total,
            aux_losses=aux,
            routings=routings,
            modality=modality,
            past_key_values=out.get(self._cache_arg),
        )

    # ---- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 16,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        use_cache: bool = True,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode up to ``max_new_tokens`` tokens (B, <= max_new_tokens); finished rows are padded with pad_token_id.

        With ``use_cache`` the image and prompt are encoded once and each step feeds one token;
        without it every step re-runs the whole sequence (the reference the cached path must match).
        Generated tokens are text. Batched prompts should be left-padded.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        B = input_ids.shape[0]
        attn = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        img = torch.zeros_like(input_ids, dtype=torch.bool) if image_mask is None else image_mask.bool()
        ids, new = input_ids, []
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        past, step_ids = None, input_ids
        for _ in range(max_new_tokens):
            if use_cache and past is not None:
                pos = (attn.cumsum(-1) - 1)[:, -1:]
                out = self.forward(
                    step_ids, attention_mask=attn, past_key_values=past, position_ids=pos, use_cache=True
                )
            else:
                out = self.forward(
                    ids,
                    attention_mask=attn,
                    pixel_values=pixel_values,
                    image_mask=img if pixel_values is not None else None,
                    use_cache=use_cache,
                )
            past = out.past_key_values if use_cache else None
            logits = out.logits[:, -1].float()
            if do_sample:
                probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            new.append(token)
            if eos_token_id is not None:
                done |= token == eos_token_id
            step_ids = token[:, None]
            ids = torch.cat([ids, step_ids], dim=1)
            attn = torch.cat([attn, torch.ones_like(step_ids)], dim=1)
            img = torch.cat([img, torch.zeros_like(step_ids, dtype=torch.bool)], dim=1)
            if bool(done.all()):
                break
        return torch.stack(new, dim=1)

    # ---- persistence ---------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write moiie_config.json + model.safetensors; each file is written to a temp name and renamed."""
        save_model_files(folder, self.moiie_config, self.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, config: LVLMConfig | None = None) -> MoIIEForCausalLM:
        """Rebuild from ``folder``; ``config`` overrides the saved one and must match the weights.

        Weights are read only from safetensors (no code runs while loading); a folder holding only
        pickled weights (``pytorch_model.bin``) is refused.
        """
        from moiie.safe_load import load_safetensors, safetensors_metadata

        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: no {name} (not a moiie checkpoint folder)")
        config = config if config is not None else LVLMConfig.load(folder / CONFIG_NAME)
        tied = json.loads(safetensors_metadata(folder / WEIGHTS_NAME).get("tied", "{}"))
        state = load_safetensors(folder / WEIGHTS_NAME)
        model = cls.from_config(reload_config(config))
        for alias, source in tied.items():
            state[alias] = state[source]
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(
            f"{k}: saved {tuple(state[k].shape)} vs config {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        )
        if missing or unexpected or shapes:
            raise ValueError(
                f"checkpoint {folder} does not match the config:\n"
                + "".join(f"  missing from checkpoint: {k}\n" for k in missing[:20])
                + "".join(f"  not in the config's model: {k}\n" for k in unexpected[:20])
                + "".join(f"  shape mismatch {s}\n" for s in shapes[:20])
                + (
                    f"  ({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shape mismatches)"
                    if len(missing) + len(unexpected) + len(shapes) > 20
                    else ""
                )
            )
        model.load_state_dict(state, strict=True)
        return model


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over positions whose label is not -100 (0 when there are none)."""
    check_tensor("labels", labels, "(batch, seq) token ids, -100 where no loss is taken")
    if not is_integer(labels):
        raise TypeError(
            f"labels must hold integer token ids (-100 where no loss is taken), got {labels.dtype}"
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}, expected {tuple(logits.shape[:-1])} like input_ids"
        )
    vocab = logits.shape[-1]
    outside = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bool(outside.any()):
        raise ValueError(
            f"labels holds {sorted(set(labels[outside].tolist()))[:5]}, outside the vocabulary 0..{vocab - 1} "
            f"(use {IGNORE_INDEX} where no loss is taken)"
        )
    target = labels[:, 1:].long()
    logit = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    total = F.cross_entropy(
        logit.reshape(-1, logit.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


def reload_config(config: LVLMConfig) -> LVLMConfig:
    """The config with weight sources replaced by architecture-only equivalents (weights come from the checkpoint)."""
    updates = {}
    for name in ("vision", "llm"):
        part = getattr(config, name)
        if hasattr(part, "architecture_only"):
            updates[name] = part.architecture_only()
    return config.model_copy(update=updates)


def save_model_files(folder: str | os.PathLike, config: LVLMConfig, state: dict[str, torch.Tensor]) -> None:
    """Write what :meth:`MoIIEForCausalLM.save_pretrained` writes from a config and a full state dict
    (used by the parallel trainer, whose ranks hold pieces of the model). Tensors sharing storage
    (tied embeddings) are written once; each file goes to a temp name and is renamed into place."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, tied = _dedup_state(state)
    _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"tied": json.dumps(tied)}))
    config = reload_config(config)
    _atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(config.to_json()))


def _dedup_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors sharing storage (tied embeddings): keep one name, record the aliases."""
    kept: dict[tuple, str] = {}
    out, tied = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in kept:
            tied[name] = kept[key]
            continue
        kept[key] = name
        out[name] = t.detach().contiguous()
    return out, tied


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
