"""Everything a training run needs, in one YAML (SPEC section 7: two stages)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from moiie.config_base import Config, ConfigError
from moiie.model import LVLMConfig
from moiie.parallel.mesh import ParallelConfig

_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
MAX_BATCH = 2**16
"""Upper bound of batch sizes and micro-batch counts: larger values are typos that would exhaust memory."""


class OptimConfig(Config):
    """AdamW with linear warmup then cosine decay."""

    kind: Literal["adamw"] = "adamw"
    lr: float = Field(5e-3, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Decoupled weight decay (paper: 0)."""
    betas: tuple[_Beta, _Beta] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    eps: float = Field(1e-8, gt=0.0)
    """AdamW epsilon."""
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Fraction of the stage's steps spent warming up linearly (paper: 3%)."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Cosine floor as a fraction of the peak learning rate."""
    grad_clip: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this value (None: no clipping)."""


class StageConfig(Config):
    """One training stage."""

    kind: Literal["stage"] = "stage"
    steps: int = Field(100, ge=0)
    """Optimizer steps (0 skips the stage)."""
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    """Samples per micro-batch."""
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH)
    """Micro-batches per optimizer step."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and schedule."""
    trainable: Literal["projector", "all_but_vision", "experts_only", "all"] = "all_but_vision"
    """Which parameters train: the projector (stage 1); everything but the vision encoder (stage 2);
    the FFN slots (experts, routers) plus the projector (the stage-2 variant); or everything, vision
    encoder included (for towers trained from scratch, which a frozen random tower would cripple)."""


class DigitsDataConfig(Config):
    """The embedded digits visual question-answering task."""

    kind: Literal["digits_vqa"] = "digits_vqa"
    task: dict[str, Any] = Field(default_factory=dict)
    """Fields of moiie.data.digits.DigitsVQAConfig (seed, question types, samples per image...)."""
    eval_limit: int | None = Field(None, ge=1)
    """Evaluate on the first N held-out samples only (None: all)."""

    @field_validator("task")
    @classmethod
    def _valid_task(cls, task: dict[str, Any]) -> dict[str, Any]:
        from moiie.data.digits import DigitsVQAConfig

        try:
            DigitsVQAConfig.parse(task)
        except ConfigError as err:  # re-anchored under data.task by ConfigError
            raise ValueError("\n".join(f"{path}: {msg}" for path, msg in err.errors)) from None
        return task


class LlavaDataConfig(Config):
    """LLaVA-style JSON/JSONL conversations with image paths."""

    kind: Literal["llava"] = "llava"
    train: str
    """Path of the training JSON/JSONL file."""
    eval: str | None = None
    """Path of the held-out JSON/JSONL file (None: no evaluation by generation)."""
    image_folder: str | None = None
    """Folder image paths are relative to (default: the JSON file's folder)."""
    eval_limit: int | None = Field(None, ge=1)
    """Evaluate on the first N held-out samples only (None: all)."""


class TokenizerConfig(Config):
    """Which tokenizer: the task's own offline tokenizer, an HF tokenizer folder, or SmolLM2's (+ `<image>`)."""

    kind: Literal["task", "hf", "smollm2"] = "task"
    path: str | None = None
    """For `hf`: a local tokenizer folder (must know `<image>` as one token or get it added)."""


class TrainConfig(Config):
    """A two-stage training run."""

    kind: Literal["train"] = "train"
    model: LVLMConfig
    """The LVLM after stage 2 (stage 1 trains its dense version)."""
    data: DigitsDataConfig | LlavaDataConfig = Field(default_factory=DigitsDataConfig, discriminator="kind")
    """Training and held-out data."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """Tokenizer."""
    stage1: StageConfig = StageConfig(steps=200, trainable="projector")
    """Alignment: train the projector of the dense model (SPEC section 7)."""
    stage2: StageConfig = StageConfig(steps=1500, trainable="all_but_vision")
    """Instruction tuning after upcycling: LLM + projector (or experts only)."""
    bf16: bool = False
    """Run forward/backward under bfloat16 autocast."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in backward to save memory."""
    seed: int = Field(0, ge=0, lt=2**31)
    """Seeds model init, data order and sampling."""
    threads: int | None = Field(None, ge=1, le=4096)
    """torch intra-op threads (None: torch's default)."""
    eval_every: int = Field(0, ge=0)
    """Evaluate by generation every N stage-2 steps (0: only at the end)."""
    eval_batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    """Samples per generation batch."""
    max_new_tokens: int = Field(4, ge=1, le=MAX_BATCH)
    """Generation budget per answer."""
    checkpoint_every: int = Field(500, ge=0)
    """Write a checkpoint every N optimizer steps (0: only at stage ends)."""
    log_every: int = Field(10, ge=1)
    """Write a metrics line every N optimizer steps."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/Inf loss or gradient: stop the run, or skip that step."""
    parallel: ParallelConfig | None = None
    """The (data x expert) layout under ``torchrun --nproc-per-node N -m moiie train``: expert-parallel
    size, data-parallel wrapper (fsdp / ddp). None: plain FSDP2 data parallelism when launched with
    several processes, one process otherwise. Stage batch sizes are global (split over the ranks)."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.stage1.trainable != "projector":
            raise ValueError(
                "stage1.trainable: stage 1 trains only the projector (SPEC section 7); set it to projector"
            )
        if self.stage2.trainable == "projector":
            raise ValueError("stage2.trainable: stage 2 trains all_but_vision or experts_only")
        return self
