import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def make_batch(T: int = 24, d: int = 16, seed: int = 0, pad: bool = True):
    """Text, an image block, text again, then right padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    modality = torch.zeros(T, dtype=torch.long)
    modality[T // 6 : T // 2] = 1
    if pad:
        modality[-3:] = -1
    return x, modality


def tiny_train_config(arm: str = "moiie", *, s1: int, s2: int, batch_size: int, eval_limit: int, **update):
    """The digits preset shrunk for tests: s1 / s2 optimizer steps of batch_size samples, one question
    per image, evaluation on the first eval_limit held-out questions, one thread, a metrics line per
    step; ``update`` overrides any other TrainConfig field."""
    from moiie.presets import digits_train_config
    from moiie.train.config import DigitsDataConfig

    base = digits_train_config(arm)
    return base.model_copy(
        update={
            "stage1": base.stage1.model_copy(update={"steps": s1, "batch_size": batch_size}),
            "stage2": base.stage2.model_copy(update={"steps": s2, "batch_size": batch_size}),
            "data": DigitsDataConfig(
                task={"samples_per_image_train": 1, "samples_per_image_eval": 1}, eval_limit=eval_limit
            ),
            "log_every": 1,
            "threads": 1,
            **update,
        }
    )
