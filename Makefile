# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo docs bench bench-peer mutants clean

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

# Mutation testing: plants each bug of tests/mutants/mutants.toml in a temporary copy
# and runs the tests that should catch it; reports the kill rate (target
# >= 90 %, docs/testing.md). Takes minutes to an hour; not part of `make test`/CI.
mutants: venv
	$(PY) tests/mutants/mutants.py --jobs 2

# Reference timings of neural-tangents in its own venv (old jax); not part of
# `make test`/CI. Writes benchmarks/peer_results.json, which `make bench` shows.
# neural-tangents 0.6.5 imports tensorflow + tf2jax at import time (its
# experimental TF port); tf2jax 0.3.6 pulls the full `tensorflow` wheel anyway,
# so tensorflow-cpu is redundant but harmless (~2.5 GB venv; tested 2026-11-28:
# tensorflow 2.16.2, numpy 1.26.4). PIP_CONSTRAINT= drops the machine's global
# pip constraint file (it only caps torch) for this venv only.
PEER_VENV := .venv-peer
PEER_PY := $(PEER_VENV)/bin/python
PEER_STAMP := $(PEER_VENV)/.installed

$(PEER_STAMP):
	test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV)
	PIP_CONSTRAINT= $(PEER_PY) -m pip install -q --upgrade pip
	PIP_CONSTRAINT= $(PEER_PY) -m pip install -q jax==0.4.25 jaxlib==0.4.25 'numpy<2' \
	    flax==0.8.4 'tensorflow-cpu<2.17' tf2jax==0.3.6 frozendict
	PIP_CONSTRAINT= $(PEER_PY) -m pip install -q --no-deps neural-tangents==0.6.5
	touch $(PEER_STAMP)

bench-peer: $(PEER_STAMP)
	$(PEER_PY) benchmarks/peer_nt.py

clean:
	rm -rf $(VENV) $(PEER_VENV) docs/_build runs
