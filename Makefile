# The two commands a newcomer needs (see README):
#   make demo   set up .venv if missing, then train the quickstart detector and print its evaluation
#   make test   set up .venv if missing, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	$(PY) -c "import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)"
	touch $@

demo: $(VENV)/.installed
	$(PY) train.py fit --config configs/quickstart.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/blocks.py --out benchmarks/results/blocks-cpu.md

clean-venv:
	rm -rf $(VENV)
