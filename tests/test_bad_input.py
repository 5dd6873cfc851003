"""Bad input gets an error naming the argument and what was expected, never a bare torch error."""

import pytest
import torch

from moiie import MoEConfig, build_ffn


@pytest.fixture
def layer():
    return build_ffn(MoEConfig(expert={"kind": "swiglu", "d_ff": 8}), d_model=8)


def test_modality_values_out_of_range(layer):
    with pytest.raises(
        ValueError, match=r"modality holds \[2\]; expected only 0 \(text\), 1 \(vision\) or -1"
    ):
        layer(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))


def test_modality_shape_mismatch(layer):
    with pytest.raises(ValueError, match=r"modality has shape \(3,\) but the hidden states need \(4,\)"):
        layer(torch.randn(4, 8), torch.tensor([0, 1, 0]))


def test_modality_float_dtype(layer):
    with pytest.raises(TypeError, match="modality must have an integer dtype"):
        layer(torch.randn(4, 8), torch.tensor([0.0, 1.0, 0.0, 1.0]))


def test_modality_not_a_tensor(layer):
    with pytest.raises(TypeError, match="modality must be a torch.Tensor"):
        layer(torch.randn(4, 8), [0, 1, 0, 1])


def test_hidden_size_mismatch(layer):
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\), got \(4, 6\)"):
        layer(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))


def test_missing_d_ff_without_backbone():
    with pytest.raises(ValueError, match="expert.d_ff is required"):
        build_ffn(MoEConfig(), d_model=8)


def test_empty_batch_is_fine(layer):
    y, routing = layer(torch.randn(0, 8), torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 8) and routing.expert_ids.shape == (0, 2)


@pytest.mark.parametrize("kind", ["swiglu", "gelu_mlp"])
def test_absurd_expert_width_is_refused_before_allocating(kind):
    from moiie.config_base import ConfigError

    with pytest.raises(ConfigError, match=r"expert\.d_ff"):
        MoEConfig.parse({"expert": {"kind": kind, "d_ff": 10**9}})
