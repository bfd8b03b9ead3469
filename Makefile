# mailmoat: `make run` starts the demo, `make test` runs the whole suite.
# Everything installs into .venv; the system Python is never touched.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint fuzz bench clean venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

venv: $(STAMP)

## run: start `mailmoat demo` (self-signed certificate on first run, a private Postfix or the built-in sink)
run: $(STAMP)
	$(VENV)/bin/mailmoat demo

## test: the whole suite (unit, codec, fuzz-corpus replay, end to end against real Postfix/swaks/openssl)
test: $(STAMP)
	$(PY) -m pytest

## lint: ruff, mypy --strict and the tier contracts
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests fuzz bench
	$(VENV)/bin/ruff format --check src tests fuzz bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

## fuzz: run the atheris harnesses for a bounded time each (FUZZ_SECONDS, default 60)
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(PY) -m pip install --quiet -e '.[fuzz]'
	@for h in fuzz/fuzz_*.py; do \
		name=$$(basename $$h .py); name=$${name#fuzz_}; \
		work=$$(mktemp -d); cp -r fuzz/corpus/$$name/. $$work/; \
		if [ -d tests/attacks/$$name ]; then cp -r tests/attacks/$$name/. $$work/; fi; \
		echo "== $$h ($(FUZZ_SECONDS)s)"; \
		$(PY) $$h -max_total_time=$(FUZZ_SECONDS) $$work || exit 1; \
		rm -rf $$work; \
	done

## bench: mailmoat side by side with its peers (SMTP, IMAP: HAProxy; HTTP: nginx, mitmproxy), and the rule engine's cost (needs root, wrk, haproxy, nginx)
bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
