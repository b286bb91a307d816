# Two commands for a newcomer: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TRAIN := KDEXP_OUTPUTS=outputs $(PY) -m kdexp.train

.PHONY: install quickstart test slurm-deps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# plain pip: it finds the local torch/torchvision wheels (other installers would download GBs)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(TRAIN) protocol=quickstart experiment=teacher model.width=16
	$(TRAIN) -m protocol=quickstart experiment=baseline seed=0,1
	$(TRAIN) -m protocol=quickstart experiment=quickstart
	$(PY) -m analysis outputs/quickstart --out outputs/quickstart/report
	@echo "runs: outputs/quickstart/   report: outputs/quickstart/report/report.html"

slurm-deps:
	bash launch/install_slurm.sh

test: install
	$(PY) -m pytest -q

clean:
	rm -rf outputs multirun .pytest_cache
