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
	$(BIN)/ruff check seg_densenet tests benchmarks
	$(BIN)/ruff format --check seg_densenet tests benchmarks
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check seg_densenet tests benchmarks
	$(BIN)/ruff format --check seg_densenet tests benchmarks

clean:
	rm -rf $(VENV) outputs multirun

# The GPU check (benchmarks/gpu_check.sh) runs on a lent CUDA machine with its own Python 3.12, torch and
# Lightning: these are the packages it lacks, as Python 3.12 wheels at the versions installed here.
GPU_PACKAGES := hydra[-_]core|omegaconf|albumentations|albucore|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|stringzilla|simsimd|segmentation[-_]models[-_]pytorch|nibabel
PLATFORMS := $(foreach n,2_28 2_27 2_17 2_5,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64 --platform manylinux1_x86_64

wheelhouse: $(STAMP)
	grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
	rm -rf .whl
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $(PLATFORMS) \
		-d .whl $$($(BIN)/pip freeze | grep -iE '^($(GPU_PACKAGES))==')
	$(BIN)/pip download --quiet --no-deps --no-binary=:all: -d .whl $$($(BIN)/pip freeze | grep -iE "^antlr4[-_]python3[-_]runtime==")
	du -sh .whl

gpu-bundle: wheelhouse
	grep -qx '/.gpu_data/' .git/info/exclude || echo '/.gpu_data/' >> .git/info/exclude
	$(BIN)/python -m benchmarks.gpu_bundle
