# sessiontag: `make demo` shows the product on a local server, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo demo-otel test bench catalog clean

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
	@$(MAKE) --no-print-directory demo-otel

# Spans from an OpenTelemetry SDK: serve in the background (up once /healthz answers; if it
# does not within 15 s, the step fails with serve's log), a plain OTel exporter, the session.
OTLP_PORT ?= 4318
demo-otel: install
	@echo; echo '$$ sessiontag serve &        # OTLP/HTTP receiver on 127.0.0.1:$(OTLP_PORT)'
	@$(BIN)/sessiontag serve --port $(OTLP_PORT) 2>$(VENV)/serve.log & pid=$$!; \
	  trap 'kill -TERM '$$pid' 2>/dev/null' EXIT; \
	  up=; deadline=$$(($$(date +%s) + 15)); while [ $$(date +%s) -lt $$deadline ]; do \
	    kill -0 $$pid 2>/dev/null || break; \
	    $(BIN)/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
	      http://127.0.0.1:$(OTLP_PORT)/healthz 2>/dev/null && { up=1; break; }; \
	    sleep 0.2; \
	  done; \
	  if [ -z "$$up" ] || ! kill -0 $$pid 2>/dev/null; then \
	    echo "sessiontag serve did not start (no answer from /healthz on 127.0.0.1:$(OTLP_PORT)); its log:" >&2; \
	    cat $(VENV)/serve.log >&2; exit 1; \
	  fi; \
	  echo '$$ OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$(OTLP_PORT) python examples/otel_chat.py'; \
	  user=$$(OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$(OTLP_PORT) $(BIN)/python examples/otel_chat.py) \
	    || { echo 'examples/otel_chat.py could not export its spans; the serve log:' >&2; cat $(VENV)/serve.log >&2; exit 1; }; \
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
