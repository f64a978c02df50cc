# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo docs bench bench-peer clean

venv: $(STAMP)

# Idempotent: rebuilt only when the dependency files change.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt --config-settings editable_mode=compat -e '.[tf,tests,docs]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -n 2 tests

demo: venv
	$(PY) examples/digits_mlp.py --workdir runs/digits

docs: venv
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

bench: venv
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) docs/_build runs
