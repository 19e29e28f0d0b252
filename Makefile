# The project's commands. Each sets up .venv itself (idempotent, quick when already set up).
#   make run    the main job: train ViT and SL-ViT on the embedded digits data (CPU, offline, ~1 min)
#   make test   every check (what CI runs): library in sync, notebooks clean, nbdev_test, pytest, docs,
#               timm's own model tests on our models
#   make docs   build the documentation site into docs/ (offline; no Quarto needed)
#   make lab    open JupyterLab on nbs/ with the project's virtual environment as kernel
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: run test docs lab venv sync-check clean-check nbtest pytest timm-tests

venv: $(VENV_STAMP)
$(VENV_STAMP): settings.ini setup.py pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(VENV_STAMP)

run: venv
	.venv/bin/vitsd-demo --overwrite   # the main job again from scratch: replaces runs/demo's runs

sync-check: venv
	$(PY) -c "from nbdev.doclinks import nbdev_export; nbdev_export()"
	@git diff --exit-code --stat -- vitsd_nbdev || { echo "FAIL: vitsd_nbdev/ differs from what the notebooks export: edit the notebook, run nbdev_export, commit both"; exit 1; }
	@test -z "$$(git status --porcelain -- vitsd_nbdev)" || { git status --porcelain -- vitsd_nbdev; echo "FAIL: untracked or changed files in vitsd_nbdev/ after export: commit them"; exit 1; }

clean-check: venv
	.venv/bin/nbdev_clean
	@git diff --exit-code --stat -- nbs || { echo "FAIL: notebooks are not clean: run .venv/bin/nbdev_clean and commit"; exit 1; }

nbtest: venv
	OMP_NUM_THREADS=1 .venv/bin/nbdev_test --n_workers 2 --timing   # two notebooks at a time, one thread each: no oversubscription of 2 cores

pytest: venv
	$(PY) -m pytest tests

timm-tests: venv   # timm's own model tests on our registered models (skips if timm's source can't be downloaded)
	OMP_NUM_THREADS=1 $(PY) tools/timm_model_tests.py -q

docs: venv
	$(PY) tools/build_docs.py

test: sync-check clean-check nbtest docs
	@git diff --exit-code --stat -- README.md || { echo "FAIL: README.md differs from what nbs/index.ipynb generates: run make docs and commit README.md"; exit 1; }
	VITSD_REQUIRE_DOCS=1 $(PY) -m pytest tests
	$(MAKE) timm-tests

lab: venv
	.venv/bin/jupyter lab --notebook-dir=nbs $(if $(filter 0,$(shell id -u)),--allow-root)
