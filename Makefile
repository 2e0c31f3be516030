# qkdnet — the two commands of the README: `make demo` and `make test`.
# Both work on a fresh Debian machine as root: they install the Debian packages,
# link kernel headers for bcc, create .venv and install the project, check with
# `qkdctl doctor` that TUN, namespaces, BPF, headers and bcc work, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-bpfcc linux-headers-amd64 iperf3 iproute2 iputils-ping tcpdump curl \
	openssh-server openssh-client nftables
STAMP := $(VENV)/.installed
# Tests run in this many pytest-xdist processes, each taking whole files (their module
# fixtures set up once): the network tests mostly wait on key rates and timeouts, so two
# at once take 8 minutes instead of 13-14 on 2 cores and still pass on a busy machine
# (0: one process, no xdist).
TEST_WORKERS ?= 2

.PHONY: demo test setup system venv lint clean teardown

demo: setup
	$(VENV)/bin/qkdctl demo

test: setup
	$(PY) -m ruff check dataplane control api bench tests
	$(PY) -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile

setup: system venv
	@$(VENV)/bin/qkdctl doctor || echo "warning: qkdctl doctor found problems (above, each with its fix)"

# Debian packages, installed only when missing so repeated runs are quick. No service of
# theirs is started (policy-rc.d), and an OpenSSH server installed here stays disabled: the
# tests run their own sshd on loopback, the machine gets no new listener on port 22.
system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  guard=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; rc=$$?; \
	  if [ -n "$$guard" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	  case "$$missing" in *openssh-server*) \
	    systemctl disable ssh.service ssh.socket >/dev/null 2>&1 || true;; esac; \
	  [ $$rc -eq 0 ] || exit $$rc; \
	fi
	@./scripts/link-kernel-headers.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@./scripts/link-bcc.sh $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

lint: setup
	$(PY) -m ruff check dataplane control api bench tests

# Removes every emulated network qkdnet left behind on this machine.
teardown:
	-$(VENV)/bin/qkdctl net down --all

clean: teardown
	rm -rf $(VENV) build *.egg-info
