# segany: set-up and entry points. `make help` lists the targets.
#
# `make test` and `make demo` do ALL the set-up on a fresh Debian 12 machine, idempotently:
#   1. Debian packages (QGIS, PyQt5, Xvfb, ...): tools/ensure-apt.sh, checked with dpkg every time.
#   2. .venv made with Debian's /usr/bin/python3 (the Python QGIS is built for), WITHOUT
#      --system-site-packages (that would leak Debian's numpy 1.24 and break rasterio).
#   3. .venv/debian-links: symlinks to Debian's qgis, PyQt5, osgeo, ... put on sys.path by a .pth
#      file, after site-packages, so pip's numpy 2 wins.
#   4. pip packages, always with -c constraints.txt (torch stays the pinned CPU wheel; an
#      unpinned torch pulls GBs of CUDA). Re-run when pyproject.toml, constraints.txt,
#      tools/requirements-frontends.txt or this Makefile change, or the venv is remade.
# Why each choice: docs in tools/*.sh and README.md "Set-up".

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# Stamps and the venv are written by one recipe at a time: no parallel jobs here.
.NOTPARALLEL:

VENV        := .venv
PY          := $(VENV)/bin/python
STAMPS      := .stamps
CONSTRAINTS := constraints.txt
FRONTENDS   := tools/requirements-frontends.txt
TORCH_PIN   := $(shell grep -E '^torch==' $(CONSTRAINTS))
# The cached CPU torch wheel: pip.conf points there already, but say it again in case a
# user's pip config is not the machine's.
FIND_LINKS  := $(if $(wildcard /opt/wheels/*.whl),--find-links /opt/wheels)
PIP_INSTALL := $(PY) -m pip install --quiet --no-input --progress-bar off -c $(CONSTRAINTS) $(FIND_LINKS)
PYTEST_ARGS ?=
DEMO_OUTPUT ?= demo_output

.PHONY: help setup test demo check-env links clean-venv qgis-plugin default-model FORCE

help: ## list the targets
	@echo "segany make targets (setup, test, demo and check-env first install what is missing):"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## /  \1\t/' | expand -t 16

setup: $(STAMPS)/pip links ## install everything (Debian packages, .venv, pip packages)

# No path argument: pyproject's testpaths run tests/ AND the core's docstring examples.
test: setup ## run the whole pytest suite and the core's doctests (pytest-xvfb starts Xvfb for napari)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup ## run the demo, writing to demo_output/
	$(PY) -m segany.demo --output $(DEMO_OUTPUT)

check-env: setup ## smoke-check torch, QGIS (+Processing), napari under Xvfb, qgis_process
	bash tools/check-env.sh $(VENV)

# Re-trains the shipped model (core/segany/weights/) from the shared data: stages resume
# where they stopped (see tools/train_default_model.py and docs/model-card.md).
TRAIN_DATA ?= $(CURDIR)/../shared/data/train
default-model: setup ## re-train segany's shipped default model from $(TRAIN_DATA) (resumable)
	$(PY) tools/train_default_model.py all --data $(TRAIN_DATA)

clean-venv: ## remove .venv and the pip stamp (the next target rebuilds them)
	rm -rf $(VENV) $(STAMPS)/pip

# The plugin folder is LINKED (not copied) so edits show after a plugin reload, and so that
# the plugin finds this checkout's .venv (segany, torch) next to it: see qgis_segany/environment.py.
QGIS_PROFILE_DIR ?= $(HOME)/.local/share/QGIS/QGIS3/profiles/default
qgis-plugin: ## link qgis_segany into the QGIS profile (override with QGIS_PROFILE_DIR=...)
	mkdir -p "$(QGIS_PROFILE_DIR)/python/plugins"
	ln -sfn "$(CURDIR)/qgis_segany" "$(QGIS_PROFILE_DIR)/python/plugins/qgis_segany"
	@echo "linked $(QGIS_PROFILE_DIR)/python/plugins/qgis_segany -> $(CURDIR)/qgis_segany"
	@echo "enable it in QGIS (Plugins > Manage and Install Plugins > Installed), or for qgis_process:"
	@echo "  QT_QPA_PLATFORM=offscreen /usr/bin/qgis_process.bin plugins enable qgis_segany"

# --- set-up steps -----------------------------------------------------------------------

# Always checked (one dpkg-query, well under a second); the stamp's mtime only moves when
# something was installed, so make's re-stat keeps dependents from re-running for nothing.
$(STAMPS)/apt: FORCE
	bash tools/ensure-apt.sh $@

# Always checked; remade only when missing, not on /usr/bin/python3, or with system site packages.
$(VENV)/pyvenv.cfg: FORCE | $(STAMPS)/apt
	bash tools/ensure-venv.sh $(VENV)

# Cheap and idempotent, so always run: a fresh machine with an old venv still gets its links.
links: $(STAMPS)/apt $(VENV)/pyvenv.cfg
	bash tools/link-debian-python.sh $(VENV)

# torch first, on its own, so that nothing later can resolve a different (CUDA) build.
# napari is installed WITHOUT Qt extras: it uses Debian's PyQt5 through the links; any pip Qt
# binding that sneaks in as a dependency is removed by tools/check-no-pip-qt.sh.
# tools/check-env.sh then proves the whole stack imports and runs before the stamp is written.
$(STAMPS)/pip: $(VENV)/pyvenv.cfg pyproject.toml $(CONSTRAINTS) $(FRONTENDS) Makefile | links
	$(PIP_INSTALL) "$(TORCH_PIN)"
	$(PIP_INSTALL) -e ".[test]"
	$(PIP_INSTALL) -r $(FRONTENDS)
	bash tools/check-no-pip-qt.sh $(VENV)
	bash tools/check-env.sh $(VENV)
	@mkdir -p $(STAMPS) && touch $@

FORCE:
