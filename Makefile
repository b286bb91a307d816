# Two commands for a newcomer: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TRAIN := KDEXP_OUTPUTS=outputs $(PY) -m kdexp.train

.PHONY: install quickstart quickstart-runs quickstart-teacher quickstart-baselines test test-fast check slurm-deps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# plain pip: it finds the local torch/torchvision wheels (other installers would download GBs)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The quickstart keeps 2 cores busy with two jobs at a time, each on one thread (a second thread per
# job would only contend with the other job): the baselines need no teacher, so they train alongside
# it; then each seed's distillations run side by side.
QUICKSTART := OMP_NUM_THREADS=1 $(TRAIN)

quickstart: install
	@echo "training the teacher and the baselines, two jobs at a time (each job's log appears when it ends)"
	$(MAKE) --no-print-directory -j2 --output-sync=target quickstart-runs
	$(PY) -m analysis outputs/quickstart --out outputs/quickstart/report
	@echo "runs: outputs/quickstart/   report: outputs/quickstart/report/report.html"

quickstart-runs: quickstart-teacher quickstart-baselines quickstart-kd-seed0 quickstart-kd-seed1
quickstart-teacher:
	$(QUICKSTART) protocol=quickstart experiment=teacher model.width=16
quickstart-baselines:
	$(QUICKSTART) -m protocol=quickstart experiment=baseline seed=0,1
quickstart-kd-seed%: quickstart-teacher
	$(QUICKSTART) -m protocol=quickstart experiment=quickstart seed=$*

# kdexp's self-test on this machine's device (README: Check your GPU); EXECUTION=fast checks bf16 and compile too
EXECUTION ?= reference
check: install
	$(PY) -m kdexp.check --execution $(EXECUTION)

slurm-deps:
	bash tests/cluster/install_slurm.sh

# Everything: unit, in-process, end-to-end (e2e), and the SLURM and GPU tiers where the machine has them.
test: install
	$(PY) -m pytest -q

# Unit and in-process tests only: no e2e (training runs, dry runs, whole-study plans), SLURM or GPU tier (README: tests).
test-fast: install
	$(PY) -m pytest -q -n auto -m "not e2e and not slurm and not gpu"

# How long the everyday commands take, beside Hydra's own floor and the targets (tests/benchmarks/cli.py);
# several minutes (it writes a 10,000-run tree for analysis). A benchmark: it judges nothing.
.PHONY: bench-cli
bench-cli: install
	$(PY) tests/benchmarks/cli.py

# Deletes every result and every exported teacher under outputs/ (README: set up).
clean:
	rm -rf outputs multirun .pytest_cache

# The GPU path measured in one call on a CUDA machine without network (README: performance).
# `make wheelhouse` here (pip reaches an index) fills .wheelhouse/ with the pure-Python wheels such
# a machine lacks; it travels with the tree and `make gpu-check` there installs from it.
.PHONY: wheelhouse gpu-check gpu-check-dry
wheelhouse: install
	$(PY) -m launch.gpu_check --build-wheelhouse

gpu-check:
	$(PYTHON) -m launch.gpu_check

# The same check on this CPU at tiny sizes, from an environment without hydra & co (minutes).
gpu-check-dry: install
	$(PY) -m pytest -q tests/test_gpu_check.py
