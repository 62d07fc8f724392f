# energy-agent — set-up, demo and tests on Debian/Ubuntu.
#   make demo   venv + packages, then a simulated plant end to end (table read back from InfluxDB)
#   make test   the same set-up, then the whole test suite against real services
#   make check  ruff (lint) and mypy (types; strict on core, domain and records)
#   make wheel-demo   the wheel, installed in a fresh venv outside the tree, runs the demo (CI runs it)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages: the services the demo and the tests start on loopback (never as system services).
APT_PACKAGES := python3 python3-venv python3-dev gcc mosquitto influxdb victoria-metrics socat
SERVICE_BINARIES := /usr/sbin/mosquitto /usr/bin/influxd /usr/bin/victoria-metrics

.PHONY: demo test check bench wheel-demo sysdeps venv kernels clean

demo: venv kernels
	$(BIN)/energy-agent demo

test: venv kernels
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Lint and type check. mypy cannot follow the editable install (setuptools maps the source
# folders to energy_agent.* with an import hook), so it runs on a tree of symlinks laid out like
# the installed package, rebuilt each time under build/typecheck; its settings are in
# pyproject.toml ([tool.mypy]).
LINT_DIRS := agent drivers simulators tests benchmarks config
TYPED_PACKAGES := energy_agent.core energy_agent.domain energy_agent.records
TYPECHECK := build/typecheck

check: venv
	$(BIN)/ruff check $(LINT_DIRS)
	rm -rf $(TYPECHECK)/energy_agent
	mkdir -p $(TYPECHECK)/energy_agent
	for f in agent/*; do [ "$${f##*/}" = __pycache__ ] || ln -s "$(CURDIR)/$$f" $(TYPECHECK)/energy_agent/; done
	ln -s "$(CURDIR)/drivers" $(TYPECHECK)/energy_agent/drivers
	ln -s "$(CURDIR)/simulators" $(TYPECHECK)/energy_agent/simulators
	ln -s "$(CURDIR)/config" $(TYPECHECK)/energy_agent/examples
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml $(addprefix -p ,$(TYPED_PACKAGES))

bench: venv kernels
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# What `pip install` of the wheel gives a plant, with no source tree on sys.path: build the wheel
# (build/ removed first: setuptools would pack files an earlier build left there), install it
# into a new venv in a temporary folder, and from that folder check the version, the shipped
# example config, a shipped scenario, the kernels and the whole demo.
wheel-demo: venv
	rm -rf build
	@set -euo pipefail; \
	tmp=$$(mktemp -d /tmp/energy-agent-wheel.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	$(BIN)/python -m pip wheel --quiet --no-deps -w "$$tmp/dist" .; \
	rm -rf build; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet "$$tmp"/dist/energy_agent-*.whl; \
	cd "$$tmp"; ea="$$tmp/venv/bin/energy-agent"; \
	set -x; \
	"$$ea" --version; \
	"$$ea" check-config -c "$$("$$ea" example-config --path)"; \
	"$$ea" simulate demo --truth > truth.json; \
	"$$ea" kernels build; \
	"$$ea" demo

venv: sysdeps $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The energy kernels compiled into numba's cache, so the agent only loads them at start.
kernels: venv
	@$(BIN)/energy-agent kernels build

# Installs what is missing, as root. Services are installed with a policy-rc.d that keeps
# apt from starting them: the demo and the tests run their own instances on free ports.
sysdeps:
	@missing=0; \
	for b in $(SERVICE_BINARIES); do [ -x $$b ] || missing=1; done; \
	command -v socat >/dev/null || missing=1; \
	command -v gcc >/dev/null || missing=1; \
	$(PYTHON) -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' 2>/dev/null || missing=1; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing=1; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "missing system packages; as root run: apt-get update && apt-get install -y $(APT_PACKAGES)"; exit 1; \
	  fi; \
	  added_policy=0; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; added_policy=1; fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); rc=$$?; \
	  [ $$added_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; \
	  exit $$rc; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
