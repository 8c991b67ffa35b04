# Two commands on a fresh machine:
#   make demo   set up .venv and run the main job (digits 0-4 -> 5-9 under finetune / linear_probe / lp_ft)
#   make test   set up .venv and run the test suite (what CI runs, via .ci/run)
# and to move to the newest versions: `make relock` (re-resolves requirements.lock, then a fresh .venv runs the suite)
PYTHON ?= python3
VENV ?= .venv
# PyTorch is installed apart from the lock, by pip (which finds this machine's local CPU build through its
# configuration: find-links); on a GPU machine without that configuration the same spec installs PyPI's CUDA build.
# The lock is resolved against the CPU build and leaves torch out, so it holds no nvidia-* package.
TORCH_VERSION := 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
# Every other package, pinned with hashes (docs/environment.md): `make setup` installs exactly these, `make relock`
# re-resolves them to the newest versions pyproject.toml allows. Resolved for CPython 3.11 on Linux x86_64 (as CI and
# cluster/Dockerfile).
LOCK := requirements.lock
# Where `make relock` finds the CPU build of torch to resolve against (this machine's pip find-links; elsewhere e.g.
# TORCH_FIND_LINKS=https://download.pytorch.org/whl/cpu/torch/)
TORCH_FIND_LINKS ?= /opt/wheels
# The installers themselves, pinned too (uv wrote the lock)
INSTALLERS := pip==26.3 uv==0.13.9
BIN := $(VENV)/bin
# The end-to-end tests and the unit tests as two pytest processes side by side (tests/run_side_by_side.py): one process
# left the two cores idle 29% of the suite (docs/performance.md).
SIDE_BY_SIDE := $(BIN)/python tests/run_side_by_side.py -q

.PHONY: setup relock demo test test-all test-fast clean

setup: $(VENV)/.installed $(VENV)/.ops-built

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
		|| echo "note: $(LOCK) was resolved for Python 3.11; this is $$($(BIN)/python -V): 'uv pip check' below says whether it fits"
	$(BIN)/pip install -q $(INSTALLERS)
	@# torch through pip (it finds a local build where one is configured); the rest through uv, exactly as locked
	@# (--no-deps: the lock is complete; --require-hashes: nothing but the locked files), compiled to bytecode as pip
	@# does, so that no first run compiles them. uv installs the ~180 packages in seconds where pip takes 1.5 min. uv
	@# does not read pip's configuration: where only pip can reach the packages (a private index in pip.conf), pip
	@# installs them, from the same lock.
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode --require-hashes --no-deps -r $(LOCK) \
		|| (echo "uv could not install the packages; installing them with pip" \
			&& $(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK))
	$(BIN)/uv pip install --python $(BIN)/python -q --no-deps -e .
	$(BIN)/uv pip check --python $(BIN)/python
	@# the browser tests drive Debian's chromium (Playwright's own browser download does not work here)
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium) || true
	touch $@

# Re-resolve the lock to the newest versions pyproject.toml's ranges allow (torch stays at TORCH_VERSION: resolved
# against its CPU build, left out of the lock), carry Ray's, DeepSpeed's and MLflow's new versions into cluster/
# (Dockerfile, KubeRay and cluster-launcher manifests), then set up a fresh .venv from the new lock and run the suite.
relock: $(VENV)/.installed
	echo "torch==$(TORCH_VERSION)+cpu" > $(VENV)/torch-cpu.txt
	$(BIN)/uv pip compile pyproject.toml --extra test --python $(BIN)/python --upgrade --generate-hashes -q \
		--find-links $(TORCH_FIND_LINKS) --constraint $(VENV)/torch-cpu.txt --no-emit-package torch \
		--custom-compile-command "make relock" -o $(LOCK)
	$(BIN)/python tools/sync_cluster_versions.py
	rm -rf $(VENV)
	$(MAKE) test

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
