# fpn_plugin developer commands. Every target that runs code sets up the environment first
# (idempotent: seconds when nothing changed). PYTHON picks the interpreter the environment is
# built from (3.11, 3.12 or 3.13); if it already imports torch, that torch (and a Detectron2 it
# has) is used untouched and only what is missing is added. SETUP_ARGS goes to
# tools/env/setup_env.py (e.g. `--wheels .whl` to install offline from a wheels folder).
PYTHON ?= python3
VENV_PY := .venv/bin/python
PYTEST_ARGS ?=
# One shuffled pass: modules in a random order, tests shuffled inside each module (module-scoped
# fixtures are built once). The seed is printed in the header ("Using --random-order-seed=N");
# rerun an order with `make test PYTEST_ARGS=--random-order-seed=N`, or keep file order with
# `make test TEST_ORDER=`. Tests needing the network are skipped unless PYTEST_ARGS has
# --run-network (CI runs them in their own step, see .ci/run).
TEST_ORDER ?= --random-order-bucket=module
DEMO_ARGS ?=
SETUP_ARGS ?=

.PHONY: setup test demo clean-env gpu-wheels

setup:
	@$(PYTHON) tools/env/setup_env.py $(SETUP_ARGS)

test: setup
	$(VENV_PY) -m pytest tests $(TEST_ORDER) $(PYTEST_ARGS)

# The CPU demo: generates the embedded shapes dataset, trains, evaluates, exports masks and
# writes overlays + the training curve under output/demo (see docs/training.md).
demo: setup
	$(VENV_PY) projects/fpn_mask_rcnn/demo.py $(DEMO_ARGS)

# Removes this checkout's .venv and the cached base environment it uses.
clean-env:
	@if [ -f .venv/.fpn_plugin_env_complete ]; then \
	  base=$$($(PYTHON) -c "import json; print(json.load(open('.venv/.fpn_plugin_env_complete'))['base'])"); \
	  echo "removing $$base"; rm -rf "$$base"; fi
	rm -rf .venv

# Wheels for an offline GPU machine with torch preinstalled (Python 3.12 by default): Detectron2
# (built here) and the small packages such an image lacks, into .whl/ (ignored; tools/gpu_check.sh
# installs from it).
gpu-wheels: setup
	$(VENV_PY) tools/env/gpu_wheels.py --dest .whl
