# stagediff — set-up, demo, tests and benchmarks. `make demo` and `make test` need nothing but python3.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO_MODEL := demo-models/tiny-sdxl

.PHONY: venv demo test bench bench-quick serve clean

$(INSTALLED): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch first: never let the resolver pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	touch $(INSTALLED)

venv: $(INSTALLED)

$(DEMO_MODEL)/model_index.json: | $(INSTALLED)
	$(VENV)/bin/stagediff tiny-model sdxl $(DEMO_MODEL)

demo: $(INSTALLED) $(DEMO_MODEL)/model_index.json
	$(VENV)/bin/stagediff generate --model $(DEMO_MODEL) \
		--prompt "a lighthouse on a cliff at dawn" --prompt "a red fox in fresh snow" \
		--seed 0 --seed 1 --manifest demo-manifest.json

test: $(INSTALLED)
	$(PY) -m pytest

# Server, pools, deployments, process workers and the warm stage workers; Ctrl-C or kill stops them all.
serve: $(INSTALLED) $(DEMO_MODEL)/model_index.json
	$(PY) -m flows.local_stack

bench: $(INSTALLED)
	$(PY) benchmarks/run.py

bench-quick: $(INSTALLED)
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf $(VENV) demo-models stagediff-store demo-manifest.json
