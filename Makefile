# Weft developer entry points. Every target is idempotent and says what it does.
#   make lab    set everything up and run the mesh demo (root)
#   make test   set everything up and run every test tier (lab tier needs root)
#   make lint   ruff, mypy, import-linter

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The Gateway API schemas the tests validate docs/examples against (tests/gatewayschema.py):
# an npm package, pinned with its integrity hashes by package-lock.json.
GWAPI  := tests/gatewayapi
GWAPI_STAMP := $(GWAPI)/node_modules/.installed-stamp
# The browser library `weft viz dashboard` serves (cytoscape, the service graph): an npm
# package pinned by package-lock.json, served from node_modules (no CDN at run time).
DASH   := weft/viz/web
DASH_STAMP := $(DASH)/node_modules/.installed-stamp
WEFT   := $(VENV)/bin/weft

.DEFAULT_GOAL := help
.PHONY: help setup host venv schemas dashboard lab lab-down bench test test-unit lint fmt clean image

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: host venv schemas dashboard ## apt packages, kernel headers link, cgroup2/bpffs mounts, .venv, test schemas, dashboard assets
	@echo "==> setup done"

host: ## host preparation only (root)
	@scripts/setup-host.sh

$(PY):
	@echo "==> venv: creating $(VENV) with $$($(PYTHON) --version)"
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: Weft needs Python >= 3.11 ($(PYTHON) is older); make PYTHON=python3.11" >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@echo "==> venv: installing weft (editable), dev tools, bench plots, the lab's gRPC, the dashboard's server"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev,bench,lab,dashboard]'
	@touch $@

# Only bcc's package directory goes into the venv: adding all of Debian's dist-packages
# would shadow the venv's pinned libraries with Debian's older ones.
venv: $(STAMP)
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	if [ -d /usr/lib/python3/dist-packages/bcc ]; then \
		if [ "$$(readlink $$site/bcc)" != /usr/lib/python3/dist-packages/bcc ]; then \
			ln -sfn /usr/lib/python3/dist-packages/bcc $$site/bcc; \
			echo "==> venv: linked Debian's bcc package into $$site"; \
		else echo "==> venv: up to date (bcc linked)"; fi; \
	else echo "==> venv: up to date; bcc missing (apt-get install python3-bpfcc, or make host)"; fi

$(GWAPI_STAMP): $(GWAPI)/package.json $(GWAPI)/package-lock.json
	@command -v npm >/dev/null || { echo "error: npm not found (the tests' Gateway API schemas are an npm package); sudo make host installs Debian's nodejs and npm" >&2; exit 1; }
	@echo "==> schemas: npm ci in $(GWAPI) (the Gateway API schemas, version pinned in package.json)"
	@cd $(GWAPI) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

schemas: $(GWAPI_STAMP) ## the Gateway API schemas the tests validate docs/examples against (npm)

$(DASH_STAMP): $(DASH)/package.json $(DASH)/package-lock.json
	@command -v npm >/dev/null || { echo "error: npm not found (the dashboard's graph library is an npm package); sudo make host installs Debian's nodejs and npm" >&2; exit 1; }
	@echo "==> dashboard: npm ci in $(DASH) (cytoscape, version pinned in package.json)"
	@cd $(DASH) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

dashboard: $(DASH_STAMP) ## the browser library weft viz dashboard serves (npm, pinned)

lab: setup ## set up, then bring up the demo lab (replaces an existing one)
	@$(WEFT) lab up --demo --replace
	@echo
	@echo "Lab is up. Try:"
	@echo "  $(WEFT) lab status"
	@echo "  $(WEFT) lab exec client-1 -- curl -s http://echo/           # the echo service: balanced over both nodes, mTLS between them"
	@echo "  $(WEFT) lab exec plain-1 -- curl -s http://echo-2:8080/     # uncaptured: direct"
	@echo "  $(WEFT) lab exec client-1 -- curl -s http://echo/ http://echo/ http://echo/ http://echo/ | grep -o '\"pod\": \"echo-.\"'   # ONE keep-alive connection, its requests spread over both replicas"
	@echo "  $(WEFT) lab exec client-1 -- $(CURDIR)/$(PY) -m weft.lab.echoclient h2 echo:80 -n 100       # ONE h2c connection: its streams spread over both replicas"
	@echo "  $(WEFT) lab exec client-1 -- $(CURDIR)/$(PY) -m weft.lab.echoclient grpc echo:9090 -n 100   # ONE gRPC channel (grpcio): its calls spread over both replicas"
	@echo "  $(WEFT) lab exec client-1 -- curl -s 'http://echo/?delay_ms=echo-2:20' ...   # make echo-2 slower (also status=503, fail=0.5): requests avoid it"
	@echo "  $(WEFT) lab exec client-1 -- curl -s http://10.240.0.11:15020/metrics | grep -E '^(request|response)_total'   # HTTP golden metrics with both identities"
	@echo "  $(WEFT) lab stop echo-2 / lab start echo-2                  # failure drill: retries, then ejection"
	@echo "  $(WEFT) lab exec node-1 -- curl -s localhost:15020/debug/state   # the node agent"
	@echo "  $(WEFT) lab restart-agent node-1 -- --workers 2              # node-1's proxy as 2 worker processes (SO_REUSEPORT; /debug/state lists them)"
	@echo "  $(WEFT) lab exec client-1 -- sh                              # a shell inside a pod"
	@echo "  $(WEFT) lab logs echo-1"
	@echo "  $(WEFT) viz stat deploy                                       # golden metrics per workload, from the agents (docs/viz.md)"
	@echo "  $(WEFT) viz edges deploy / viz routes svc/echo / viz top     # who talks to whom (mTLS), per route, busiest"
	@echo "  $(WEFT) viz tap deploy/echo --max 10                          # live requests from both ends' agents with both identities (Ctrl-C stops)"
	@echo "  $(WEFT) viz dashboard                                         # the service graph, figures, traces and live tap in a browser: http://127.0.0.1:50750/"
	@echo "  $(WEFT) check"
	@echo "  $(WEFT) lab down                                             # leaves nothing behind"

bench: setup ## the side-by-side benchmark (about 30 min); results in docs/results/bench.json
	@$(WEFT) bench --json docs/results/bench.json

image: ## the Weft image (weft:latest) on a Debian 12 base bootstrapped here; no registry (root)
	@scripts/image.sh

lab-down: ## tear the demo lab down
	@$(WEFT) lab down

test: setup ## set up, then run all test tiers (unit, sockets, lab)
	@echo "==> test: pytest (lab tier included when root)"
	@$(PY) -m pytest

test-unit: venv schemas ## only the tests that need neither root nor a lab
	@$(PY) -m pytest -m "not lab"

lint: venv ## ruff, mypy (strict), import-linter contracts
	@echo "==> lint: ruff"
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@echo "==> lint: mypy"
	@$(VENV)/bin/mypy
	@echo "==> lint: import-linter"
	@$(VENV)/bin/lint-imports

fmt: venv ## apply ruff formatting and fixes
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

clean: ## remove the venv and caches (does not touch a running lab)
	rm -rf $(VENV) $(GWAPI)/node_modules $(DASH)/node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
