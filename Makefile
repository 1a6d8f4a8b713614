# Two entry points for a fresh machine: `make train` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install train test lint clean wheelhouse gpu-bundle

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python -m seg_densenet.train $(ARGS)

# Two pytest workers (pytest-xdist): most tests wait on one core (a CLI's imports, tiny tensors), so two
# share a 2-core machine well; tests of one xdist_group (a costly module fixture) stay on one worker.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check seg_densenet tests benchmarks scripts
	$(BIN)/ruff format --check seg_densenet tests benchmarks scripts
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check seg_densenet tests benchmarks scripts
	$(BIN)/ruff format --check seg_densenet tests benchmarks scripts

clean:
	rm -rf $(VENV) outputs multirun

# Offline installs (issue 16): every wheel seg-densenet needs, test tools included, for a target Python and
# platform, in wheelhouse/; there, in the checkout: pip install --no-index --find-links wheelhouse -e '.[dev]'.
# WHEELHOUSE_ARGS=--no-torch leaves out PyTorch and its CUDA libraries (several GB) for machines with their own.
TARGET_PYTHON ?= 3.12
WHEELHOUSE_ARGS ?=

wheelhouse: $(STAMP)
	grep -qx '/wheelhouse/' .git/info/exclude || echo '/wheelhouse/' >> .git/info/exclude
	rm -rf wheelhouse
	$(BIN)/python scripts/wheelhouse.py --out wheelhouse --python $(TARGET_PYTHON) --extras export dev $(WHEELHOUSE_ARGS)
	du -sh wheelhouse

# The GPU check (scripts/gpu_check.sh) on the lent CUDA machine, which has its own Python 3.12, torch and
# Lightning: .whl/ holds the packages it lacks (within the 64 MiB a device run may carry), .gpu_data/ the
# lent ACDC copy packed to 8-bit levels.
GPU_PACKAGES := hydra-core omegaconf antlr4-python3-runtime albumentations albucore pydantic pydantic-core \
	annotated-types typing-inspection stringzilla simsimd segmentation-models-pytorch nibabel pytest pluggy iniconfig

gpu-bundle: $(STAMP)
	grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
	grep -qx '/.gpu_data/' .git/info/exclude || echo '/.gpu_data/' >> .git/info/exclude
	rm -rf .whl
	$(BIN)/python scripts/wheelhouse.py --out .whl --python 3.12 --extras export dev --only $(GPU_PACKAGES)
	$(BIN)/python -m benchmarks.gpu_bundle
	du -sh .whl .gpu_data
