# fpn_plugin developer commands. Every target that runs code sets up the environment first
# (idempotent: seconds when nothing changed). PYTHON picks the interpreter the environment is
# built from; if it already imports Detectron2, that Detectron2 is used untouched.
PYTHON ?= python3
VENV_PY := .venv/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup test demo clean-env

setup:
	@$(PYTHON) tools/env/setup_env.py

test: setup
	$(VENV_PY) -m pytest tests $(PYTEST_ARGS)

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
