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

# `make repro PRESET=presets/dab_detr.yaml [EXP_ARGS="-n dab --temp"]`: the pipeline as a DVC experiment with
# the preset's values (`dvc exp run -S ...`, from `python -m kd.presets show`); params.yaml is not edited by
# hand and `dvc exp show` lists the run. Without PRESET: plain `dvc repro`.
repro: venv
	@test -d .dvc || $(BIN)/dvc init --quiet
ifdef PRESET
	@echo ">> dvc exp run with $(PRESET): data -> teacher -> students -> distillation -> reports"
	@set -e; S="$$($(BIN)/python -m kd.presets show $(PRESET))"; echo "$(BIN)/dvc exp run $$S $(EXP_ARGS)"; \
	export PATH="$(CURDIR)/$(BIN):$$PATH" JUPYTER_PATH="$(CURDIR)/$(VENV)/share/jupyter"; \
	eval "$(BIN)/dvc exp run $$S $(EXP_ARGS)"
else
	@echo ">> dvc repro: data -> teacher -> students -> distillation -> reports (see dvc.yaml)"
	PATH="$(CURDIR)/$(BIN):$$PATH" JUPYTER_PATH="$(CURDIR)/$(VENV)/share/jupyter" $(BIN)/dvc repro
endif

test: venv
	@echo ">> pytest (the whole suite, slow tests included)"
	PATH="$(CURDIR)/$(BIN):$$PATH" JUPYTER_PATH="$(CURDIR)/$(VENV)/share/jupyter" $(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check kd tests bench
	$(BIN)/ruff format --check kd tests bench

# `make lab [LAB_ARGS="--no-browser --port=8899 --ip=0.0.0.0"]`; root (containers) needs --allow-root
lab: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" JUPYTER_PATH="$(CURDIR)/$(VENV)/share/jupyter" $(BIN)/jupyter lab notebooks \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

bench: venv
	$(BIN)/python bench/detector_speed.py

clean-venv:
	rm -rf $(VENV)
