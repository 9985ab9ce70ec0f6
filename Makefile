# sessiontag: `make demo` shows the product on a local server, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test bench catalog clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	./.ci/install-system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/sessiontag db start
	$(BIN)/sessiontag migrate
	$(BIN)/sessiontag demo

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m bench

# Regenerates pysrc/sessiontag/expected_catalog.json from sql/ (commit the diff).
catalog: install
	$(BIN)/python -m tests.catalog_tool > pysrc/sessiontag/expected_catalog.json

clean:
	rm -rf $(VENV) .pytest_cache build dist
