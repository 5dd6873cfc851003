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
