# `make demo` and `make test` set themselves up on a fresh machine (a .venv with the package).
# The demo installs what training needs; the tests add the extras they exercise (HF export,
# lm-eval, gs:// against a local GCS server, libtpu for TPU compiles).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_EXTRAS ?= data
TEST_EXTRAS ?= test,data,hf,eval,gcs,tpu

.PHONY: demo test rehearse clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[$(DEMO_EXTRAS)]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[$(TEST_EXTRAS)]'
	touch $@

# XLA:CPU's YNNPACK dot fusion: the tiny step ~1.35x faster on this 2-core CPU (BENCHMARKS.md).
CPU_XLA_FLAGS ?= --xla_cpu_experimental_ynn_fusion_type=dot

# Layers unrolled (the same stacked params): at tiny shapes the layer scan's bookkeeping, zeroed
# buffers for the per-layer residuals and their dynamic-update-slices, is 15% of the step
# (BENCHMARKS.md "Where the tiny step's time goes").
demo: $(VENV)/.demo-installed
	XLA_FLAGS="$(CPU_XLA_FLAGS) $$XLA_FLAGS" $(VENV)/bin/idea-prune run --config configs/tiny.py \
	  --config.model.unroll_layers=true --workdir runs/tiny

# One worker per core (at most 4: each holds its own JAX and spawns multi-device processes); a
# file stays on one worker, so module fixtures (the 8-device mesh runs, the GCS server) run once.
test: $(VENV)/.test-installed
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

# The pod path rehearsed on this machine (docs/tpu.md): launch/*.sh against tests/fake_gcloud, two
# local workers per slice training on a gs:// workdir in fake-gcs-server; one file per worker.
rehearse: $(VENV)/.test-installed
	$(PY) -m pytest -q -n 2 --dist loadfile tests/test_rehearsal.py tests/test_rehearsal_faults.py

clean:
	rm -rf $(VENV) runs
