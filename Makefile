# Set-up, the main job and the tests. Every target creates .venv/ at the
# repository root on first use (about 4 minutes on a fresh machine).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test wheelhouse clean

# requirements.lock pins every package of a venv seen working (docs/traps.md).
$(BIN)/make-dist: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	# torch first and pinned, so no dependency pulls another torch build.
	$(BIN)/pip install -q -c requirements.lock torch torchvision
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	touch $@

setup: $(BIN)/make-dist

demo: setup
	$(BIN)/make-dist demo

test: setup
	$(BIN)/python -m pytest -q --durations=15

# The offline wheel set for a GPU host without internet (docs/gpu-hosts.md).
wheelhouse: setup
	$(BIN)/make-dist wheelhouse --out wheelhouse

clean:
	rm -rf $(VENV) build *.egg-info
