# uap-cxr: universal adversarial perturbations against chest X-ray classifiers.
# `make install` then `make test` on a fresh machine; `make help` lists the rest.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
# the MLflow UI / server bind address: 127.0.0.1 (this machine only) unless you set MLFLOW_HOST=...
# (not HOST, which many shells set to the machine's name)
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
# `make server`: the database of runs (SQLAlchemy URI: sqlite:///FILE, postgresql://USER:PASSWORD@HOST:PORT/DB for
# many concurrent jobs), the folder of artifacts, and the server's request-handling processes
MLFLOW_BACKEND   ?= sqlite:///mlflow.db
MLFLOW_ARTIFACTS ?= ./mlartifacts
MLFLOW_WORKERS   ?= 4
ARGS    ?=
WORKERS ?= 2    # `make test`: pytest processes (pytest-xdist), one torch thread each

.DEFAULT_GOAL := help
.PHONY: help install lint test test-full run sweep report results bench transfer defense min-zeta ui server clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install:  ## create .venv and install the package with its test, bench, cluster, proxy and dicom extras
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,bench,cluster,proxy,dicom]'
	@$(PYTHON) -c "import torch, timm, pytorch_lightning, mlflow, hydra; print('installed: torch', torch.__version__, '| timm', timm.__version__, '| lightning', pytorch_lightning.__version__, '| mlflow', mlflow.__version__)"

lint:  ## ruff (configured in pyproject.toml) over pipeline/ and tests/
	$(BIN)/ruff check pipeline tests

# Tests are mostly small models and process start-up, which one torch thread per process runs as fast as
# two: WORKERS processes of one thread each (a test file stays on one process, its fixtures built once).
test:  ## the CI suite: unit tests, phantom end-to-end, real-data tests on ../shared/data/cxr3
	OMP_NUM_THREADS=1 $(BIN)/pytest -q tests -n $(WORKERS) --dist loadfile $(ARGS)

test-full:  ## everything, including tests marked slow
	OMP_NUM_THREADS=1 $(BIN)/pytest -q tests -m "" -n $(WORKERS) --dist loadfile $(ARGS)

run:  ## the main job on the phantom default (ARGS="data=cxr3 model=resnet18 ..." for others)
	$(PYTHON) -m pipeline $(ARGS)

sweep:  ## a sweep, e.g. make sweep ARGS="+sweep=norm_grid data=cxr3"
	$(PYTHON) -m pipeline -m $(ARGS)

report:  ## tables and figures from the MLflow store into outputs/report/
	$(PYTHON) -m pipeline.report $(ARGS)

results:  ## the paper's grid on ../shared/data/cxr3 with grid_uap (144 jobs, training included), report in outputs/report_cxr3
	$(PYTHON) -m pipeline +sweep=cxr3_paper -m $(ARGS)
	$(PYTHON) -m pipeline.report --sweep cxr3_paper --out outputs/report_cxr3

bench:  ## UAP generation side by side with ART (tables in outputs/bench/benchmarks.md; ARGS="--out docs/benchmarks.md" updates the docs, "--quick" a smoke run)
	$(PYTHON) -m pipeline.bench $(ARGS)

transfer:  ## transferability matrix of UAPs across models (ARGS="transfer.models=[tiny,resnet18] data=cxr3")
	$(PYTHON) -m pipeline task=transfer $(ARGS)

defense:  ## UAP adversarial fine-tuning rounds (ARGS="defense.rounds=5 data=cxr3")
	$(PYTHON) -m pipeline task=defense $(ARGS)

min-zeta:  ## smallest zeta reaching a target FR, by bisection (ARGS="min_zeta.target_fr=0.8 data=cxr3")
	$(PYTHON) -m pipeline task=min_zeta $(ARGS)

ui:  ## MLflow UI on the local store; open the runs table it prints (the experiment's default columns)
	@echo "runs table: http://$(MLFLOW_HOST):$(MLFLOW_PORT)/#/experiments/1/runs?viewStateShareKey=uap-cxr&workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

server:  ## MLflow tracking server for parallel jobs (tracking=server); MLFLOW_BACKEND=postgresql://... for many writers
	$(BIN)/mlflow server --backend-store-uri '$(MLFLOW_BACKEND)' --artifacts-destination '$(MLFLOW_ARTIFACTS)' --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS) $(ARGS)

clean:  ## remove run outputs, caches and the local MLflow store (keeps .venv)
	rm -rf outputs mlruns mlartifacts mlflow.db .pytest_cache lightning_logs
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
