# Two commands on a fresh machine: `make repro` (the whole pipeline) and `make test` (pytest).
# Both create .venv when it is missing; both are idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNEL := kd

.PHONY: venv repro test lint lab bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo ">> creating the virtual environment in $(VENV) (torch 2.14.1, torchvision 0.29.1, dvc, papermill, ...)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --progress-bar off -e ".[dev]"
	@echo ">> registering the Jupyter kernel '$(KERNEL)' (papermill and JupyterLab both use it)"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name $(KERNEL) --display-name "Python (kd)" >/dev/null
	@touch $(STAMP)

repro: venv
	@echo ">> dvc repro: data -> teacher -> students -> distillation -> reports (see dvc.yaml)"
	@test -d .dvc || $(BIN)/dvc init --quiet
	PATH="$(CURDIR)/$(BIN):$$PATH" JUPYTER_PATH="$(CURDIR)/$(VENV)/share/jupyter" $(BIN)/dvc repro

test: venv
	@echo ">> pytest (the whole suite, slow tests included)"
	PATH="$(CURDIR)/$(BIN):$$PATH" JUPYTER_PATH="$(CURDIR)/$(VENV)/share/jupyter" $(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check kd tests bench
	$(BIN)/ruff format --check kd tests bench

lab: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" JUPYTER_PATH="$(CURDIR)/$(VENV)/share/jupyter" $(BIN)/jupyter lab notebooks

bench: venv
	$(BIN)/python bench/detector_speed.py

clean-venv:
	rm -rf $(VENV)
