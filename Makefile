# Set-up, the main job and the tests. Every target creates .venv/ at the
# repository root on first use (74 s on a fresh 2-core machine).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast wheelhouse clean

# uv installs the pins of requirements.lock (every package of a venv seen
# working, docs/traps.md) in seconds where pip takes minutes. It reads no
# pip.conf: it is handed the package indexes pip is configured with, if any
# (a PIP_* variable first, as pip reads them), and picks the best match among
# them as pip does, and compiles the bytecode as pip does (uncompiled, with
# PYTHONDONTWRITEBYTECODE set, every process compiles every module it imports).
# torch is pinned in the lock, so nothing pulls another torch build.
empty :=
space := $(empty) $(empty)
comma := ,
pip_setting = $(or $(PIP_$(1)),$(shell $(PY) -m pip config get global.$(2) 2>/dev/null))
uv_setting = $(if $(strip $(2)),UV_$(1)="$(strip $(2))")
UV = $(call uv_setting,INDEX_URL,$(call pip_setting,INDEX_URL,index-url)) \
     $(call uv_setting,EXTRA_INDEX_URL,$(call pip_setting,EXTRA_INDEX_URL,extra-index-url)) \
     $(call uv_setting,FIND_LINKS,$(subst $(space),$(comma),$(strip $(call pip_setting,FIND_LINKS,find-links)))) \
     UV_INDEX_STRATEGY=unsafe-best-match $(BIN)/uv

$(BIN)/make-dist: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements.lock uv
	$(UV) pip install -q --compile-bytecode --python $(BIN)/python -c requirements.lock -e '.[test]' \
	  || { echo "uv could not install the set: pip installs it (minutes)"; \
	       $(BIN)/pip install -q -c requirements.lock torch torchvision && \
	       $(BIN)/pip install -q -c requirements.lock -e '.[test]'; }
	touch $@

setup: $(BIN)/make-dist

demo: setup
	$(BIN)/make-dist demo

test: setup
	$(BIN)/python -m pytest -q --durations=15

# What needs no Ray cluster, no server and no second process group (the
# Trainer's step, checkpoints, resume and export included): a few minutes,
# for while you work. `make test` runs it all.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

# The offline wheel set for a GPU host without internet (docs/gpu-hosts.md).
wheelhouse: setup
	$(BIN)/make-dist wheelhouse --out wheelhouse

clean:
	rm -rf $(VENV) build *.egg-info
