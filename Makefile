# PAKE Mesh. `make demo` and `make test` work on a fresh machine: they create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-tour test compile bench soak certs clean help

help:
	@echo "make demo   - run the demo mesh on loopback under its control plane (Ctrl-C stops it)"
	@echo "make demo-tour - the same mesh walked through with a printed narrative, then exit"
	@echo "make test   - type-check (mypy, strict on sidecar/ and certs/), then run the test suite"
	@echo "make compile - build the sidecar's hot path with mypyc, beside its source (demo, bench and test do it when it is missing or stale)"
	@echo "make bench  - benchmark the sidecar against a direct path and HAProxy, and the control plane's push fan-out"
	@echo "make soak   - a joined mesh under mixed traffic for SOAK_SECONDS (default 600) with rotations and a control-plane restart; failed requests and RSS"
	@echo "make certs  - create the demo CA, workload certificates and the gateway's demo server certificate (examples/mtls/certs)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The hot path compiled with mypyc (sidecar/compiled.py), rebuilt only when a source is newer.
# Without a C compiler it says so and the sidecar runs as Python; in CI it must build.
COMPILE := $(PY) -m sidecar.compiled build --if-stale $(if $(CI),--required)
# What runs again against the pure-Python form (PAKE_PURE_PYTHON=1) after the whole suite ran
# against the compiled one: every in-process test, and the data plane's HTTP, mTLS and
# resilience end to end.
PURE_TESTS := tests/unit tests/fuzz tests/integration/test_http_framing.py \
	tests/integration/test_http_proxying.py tests/integration/test_mtls.py \
	tests/integration/test_resilience.py

compile: $(STAMP)
	$(COMPILE)

demo: compile
	$(PY) -m examples.demo $(DEMO_ARGS)

demo-tour: compile
	$(PY) -m examples.pake.tour $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m mypy
	$(COMPILE)
	$(PY) -m pytest -q
	PAKE_PURE_PYTHON=1 $(PY) -m pytest -q $(PURE_TESTS)

bench: compile
	$(PY) -m bench.run --mtls --fanout $(BENCH_ARGS)

soak: compile
	$(PY) -m bench.soak

certs: $(STAMP)
	$(PY) -m examples.certs

clean:
	find sidecar -name '*.so' -delete
	rm -rf $(VENV) .pytest_cache bench/results.json examples/mtls/certs
