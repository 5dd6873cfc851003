"""The README's Python examples parse as configs (so the documented field names stay real)."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_lvlm_example_validates(tmp_path):
    from moiie.model import LVLMConfig

    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "LVLMConfig(" in b)
    code = block.split("model = MoIIEForCausalLM")[0]
    code = code.replace("/path/to/local/hf/causal-lm", str(tmp_path)).replace("/path/open_clip.safetensors", "x")
    namespace: dict = {}
    try:
        exec(code, namespace)
    except Exception as err:  # a path that does not exist is fine; a wrong field name is not
        assert "unknown field" not in str(err) and "Field required" not in str(err), err
    cfg = LVLMConfig.model_validate({
        "vision": {"kind": "open_clip", "model": "ViT-B-32"},
        "llm": {"kind": "hf_causal_lm", "config": {"model_type": "llama"}},
    })
    assert cfg.moe_layers == "odd"


def test_readme_custom_router_example_runs():
    from moiie import ROUTERS

    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "assert_router_properties" in b)
    namespace: dict = {}
    exec(block, namespace)
    try:
        namespace["test_temp_router"]()
    finally:
        ROUTERS.unregister("temp")
