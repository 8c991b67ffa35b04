# Two commands on a fresh machine:
#   make demo   set up .venv and run the main job (digits 0-4 -> 5-9 under finetune / linear_probe / lp_ft)
#   make test   set up .venv and run the test suite (what CI runs, via .ci/run)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; on a GPU machine use e.g. `make demo TORCH_SPEC=torch` (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# The end-to-end tests and the unit tests as two pytest processes side by side (tests/run_side_by_side.py): one process
# left the two cores idle 29% of the suite (docs/performance.md).
SIDE_BY_SIDE := $(BIN)/python tests/run_side_by_side.py -q

.PHONY: setup demo test test-all test-fast clean

setup: $(VENV)/.installed $(VENV)/.ops-built

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip uv
	@# torch through pip (it finds a local build where one is configured); the rest through uv, which resolves and
	@# installs the ~200 packages in seconds where pip takes 1.5 min (uv keeps the torch installed above), compiled to
	@# bytecode as pip does, so that no first run compiles them. uv does not read pip's configuration: where only pip
	@# can reach the packages (a private index in pip.conf), pip installs them.
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode -e ".[test]" \
		|| (echo "uv could not install the packages; installing them with pip" && $(BIN)/pip install -q -e ".[test]")
	@# the browser tests drive Debian's chromium (Playwright's own browser download does not work here)
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium) || true
	touch $@

# DeepSpeed's CPU C++ op, built once now into the environment's own folder ($(VENV)/torch_extensions, where runs
# look for it) rather than by a first run's workers, under a lock that a killed build leaves behind.
$(VENV)/.ops-built: $(VENV)/.installed
	$(BIN)/python -c "from forgetless.platform.worker.op_builds import build_ops; build_ops()"
	touch $@

demo: setup
	$(BIN)/forgetless compare examples/digits_transfer.yaml

test: setup
	$(SIDE_BY_SIDE) -m "not slow" --durations=25

test-all: setup
	$(SIDE_BY_SIDE) --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e"

clean:
	rm -rf forgetless_runs mlruns mlflow.db
