VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap
	scripts/bootstrap

# The main job on the embedded default: a loopback STARTTLS upstream, an SQLite ledger,
# a PHP mail() piped through `sendmail -t -i`, and what arrived.
demo: setup
	$(PY) scripts/demo.py

test: setup
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check sendmail_shim tests scripts
	$(VENV)/bin/mypy

bench: setup
	$(PY) scripts/bench.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
