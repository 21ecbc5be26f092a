# `make demo` and `make test` set themselves up on a fresh machine (a .venv with the package).
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,data,hf,tpu

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/idea-prune run --config configs/tiny.py --workdir runs/tiny

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
