# PAKE Mesh. `make demo` and `make test` work on a fresh machine: they create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-tour test bench soak certs clean help

help:
	@echo "make demo   - run the demo mesh on loopback under its control plane (Ctrl-C stops it)"
	@echo "make demo-tour - the same mesh walked through with a printed narrative, then exit"
	@echo "make test   - type-check (mypy, strict on sidecar/ and certs/), then run the test suite"
	@echo "make bench  - benchmark the sidecar against a direct path and HAProxy, and the control plane's push fan-out"
	@echo "make soak   - a joined mesh under mixed traffic for SOAK_SECONDS (default 600) with rotations and a control-plane restart; failed requests and RSS"
	@echo "make certs  - create the demo CA, workload certificates and the gateway's demo server certificate (examples/mtls/certs)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo $(DEMO_ARGS)

demo-tour: $(STAMP)
	$(PY) -m examples.pake.tour $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m mypy
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.run --mtls --fanout $(BENCH_ARGS)

soak: $(STAMP)
	$(PY) -m bench.soak

certs: $(STAMP)
	$(PY) -m examples.certs

clean:
	rm -rf $(VENV) .pytest_cache bench/results.json examples/mtls/certs
