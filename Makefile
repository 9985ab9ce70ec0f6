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

# The main job on the local server: load a workload, look at it, and end with the A/B verdict.
demo: install
	$(BIN)/sessiontag db start
	$(BIN)/sessiontag migrate
	$(BIN)/sessiontag demo --users 12
	@echo; echo '$$ sessiontag sessions list --limit 10'
	@$(BIN)/sessiontag sessions list --limit 10 2>/dev/null
	@set -- $$($(BIN)/sessiontag sessions list --limit 1 --format csv 2>/dev/null | tail -n 1 | cut -d, -f1,3 | tr , ' '); \
	  echo; echo "\$$ sessiontag traces list --tag $$1 --user $$2"; \
	  $(BIN)/sessiontag traces list --tag "$$1" --user "$$2" --limit 12 2>/dev/null
	@echo; echo '$$ sessiontag compare'
	@$(BIN)/sessiontag compare
	@echo; echo '$$ sessiontag compare --baseline gpt-4o --feedback thumbs'
	@$(BIN)/sessiontag compare --baseline gpt-4o --feedback thumbs
	@# Spans from an OpenTelemetry SDK: serve in the background, a plain OTel exporter, the session.
	@echo; echo '$$ sessiontag serve &        # OTLP/HTTP receiver on 127.0.0.1:4318'
	@$(BIN)/sessiontag serve 2>$(VENV)/serve.log & pid=$$!; trap 'kill -TERM '$$pid' 2>/dev/null' EXIT; \
	  echo '$$ OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 python examples/otel_chat.py'; \
	  user=$$(OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 $(BIN)/python examples/otel_chat.py) \
	    || { cat $(VENV)/serve.log; exit 1; }; \
	  echo "\$$ sessiontag sessions list --user $$user"; \
	  $(BIN)/sessiontag sessions list --user "$$user" 2>/dev/null; \
	  kill -TERM $$pid; wait $$pid; trap - EXIT; echo '(sessiontag serve stopped)'

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m bench

# Regenerates pysrc/sessiontag/expected_catalog.json from sql/ (commit the diff).
catalog: install
	$(BIN)/python -m tests.catalog_tool > pysrc/sessiontag/expected_catalog.json

clean:
	rm -rf $(VENV) .pytest_cache build dist
