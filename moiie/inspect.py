"""``moiie inspect``: routing diagnostics of a saved model on held-out data (table + PNG heatmaps)."""

from __future__ import annotations

from pathlib import Path

from moiie.diagnostics import save_heatmaps
from moiie.model import CONFIG_NAME, MoIIEForCausalLM
from moiie.processor import LVLMProcessor


def _model_folder(path: Path) -> Path:
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    ckpts = sorted((path / "checkpoints").glob("ckpt-*")) if (path / "checkpoints").is_dir() else []
    if ckpts:
        return ckpts[-1]
    raise FileNotFoundError(f"{path}: no moiie model here (expected {CONFIG_NAME} in it or in model/)")


def _train_config(model_dir: Path):
    from moiie.train.config import TrainConfig

    for folder in (model_dir, *model_dir.parents[:3]):
        if (folder / "config.yaml").is_file():
            return TrainConfig.load(folder / "config.yaml")
    return None


def inspect_checkpoint(path: str, *, out: str | None = None, limit: int = 512) -> str:
    """Route held-out samples through the model; return the table and write heatmaps to ``out``."""
    from moiie.train.config import DigitsDataConfig, TokenizerConfig
    from moiie.train.data import encode_examples, load_task
    from moiie.train.evaluate import routing_diagnostics

    model_dir = _model_folder(Path(path))
    model = MoIIEForCausalLM.from_pretrained(model_dir).eval()
    cfg = _train_config(model_dir)
    data, tok_cfg = (cfg.data, cfg.tokenizer) if cfg else (DigitsDataConfig(), TokenizerConfig())
    _, held, tokenizer = load_task(data, tok_cfg)
    processor = LVLMProcessor(tokenizer, model.vision.preprocess, model.n_image_tokens)
    samples = encode_examples(held[:limit], tokenizer, processor)
    topology = getattr(model.moiie_config.ffn, "topology", None)
    stats = routing_diagnostics(model, samples, processor, topology)
    if stats is None:
        return f"{model_dir}: no routed FFN layers (dense model); nothing to inspect"
    out_dir = Path(out) if out else model_dir / "inspect"
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "expert_load.png"
    save_heatmaps(stats, str(png), title=f"{model_dir}: expert load share")
    header = (
        f"{model_dir}: {len(samples)} held-out samples, MoE layers at decoder layers "
        f"{model.moe_layer_indices}, router {model.moiie_config.ffn.router.kind}"
    )
    return f"{header}\n{stats.table()}\nheatmaps: {png}"
