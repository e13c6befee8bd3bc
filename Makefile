# Every user-facing target does its own set-up on a fresh Debian machine (run as root).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := iptables nftables libnetfilter-queue-dev libnfnetlink-dev iproute2 tcpdump curl wget \
                iperf3 dnsutils conntrack iputils-ping build-essential python3-dev python3-venv procps dnsmasq-base dnsperf ethtool \
                clang llvm libbpf-dev bpftool tftpd-hpa tftp-hpa postgresql

.PHONY: all deps venv bpf test unit test-compose demo bench clean distclean

all: venv

# System packages: only installed when one of the tools is missing. A policy-rc.d during
# the install keeps apt from starting the servers among them (tftpd, PostgreSQL) on the
# host: the tests run their own, inside the lab's namespaces.
build/.deps:
	@mkdir -p build
	@if ! command -v iptables >/dev/null || ! command -v tcpdump >/dev/null \
	    || ! command -v iperf3 >/dev/null || ! test -e /usr/include/libnetfilter_queue/libnetfilter_queue.h \
	    || ! command -v curl >/dev/null || ! command -v dig >/dev/null || ! command -v nft >/dev/null \
	    || ! command -v dnsmasq >/dev/null || ! command -v dnsperf >/dev/null || ! command -v nstat >/dev/null \
	    || ! command -v ethtool >/dev/null || ! command -v ping >/dev/null || ! command -v clang >/dev/null || ! test -e /usr/include/bpf/bpf_helpers.h \
	    || ! command -v in.tftpd >/dev/null || ! command -v tftp >/dev/null || ! command -v pgbench >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  echo "installing system packages: $(APT_PACKAGES)"; \
	  made=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made=1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  rc=$$?; if [ -n "$$made" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; \
	fi
	@touch $@

deps: build/.deps

# The kernel fast path's program (gateway/fastpath/bpf): clang -target bpf.
BPF_OBJ := gateway/fastpath/bpf/serval_tc.o
$(BPF_OBJ): gateway/fastpath/bpf/serval_tc.c gateway/fastpath/bpf/fastpath.h build/.deps
	clang -O2 -g -Wall -target bpf -I/usr/include/$$(gcc -dumpmachine) -c $< -o $@

bpf: $(BPF_OBJ)

$(VENV)/.installed: build/.deps setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

test: venv bpf
	$(PY) -m lab.cleanup
	$(PY) -m pytest -q -rs tests

unit: venv bpf
	$(PY) -m pytest -q -rs tests/unit

# docker-compose.yml for real (Docker engine, a locally made base image; minutes the first
# time, cached in build/ after). Not part of `make test`; CI runs both.
test-compose: venv bpf
	SERVAL_TEST_COMPOSE=1 $(PY) -m pytest -q -rs -s tests/deploy

# The whole system in namespaces, each step checked (lab/demo.py); STEP=NAME (or
# STEP="move restart") runs only those: pair name spread failover move restart.
demo: venv bpf
	$(PY) -m lab.demo $(foreach s,$(STEP),--step $(s))

# The tools of bench/fastpath.py (HAProxy, socat, memcached, PostgreSQL, an HTTP server and
# their load generators): only installed when one is missing, and not by `make test`.
# A policy-rc.d during the install keeps apt from starting these daemons on the host
# (the benchmark runs its own, inside the lab's namespaces).
BENCH_APT_PACKAGES := haproxy socat memcached libmemcached-tools postgresql apache2-utils lighttpd

.PHONY: bench-deps
bench-deps:
	@if ! command -v haproxy >/dev/null || ! command -v socat >/dev/null || ! command -v memcached >/dev/null \
	    || ! command -v memcaslap >/dev/null || ! command -v pgbench >/dev/null || ! command -v ab >/dev/null \
	    || ! command -v lighttpd >/dev/null || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  echo "installing benchmark tools: $(BENCH_APT_PACKAGES)"; \
	  made=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made=1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_APT_PACKAGES) >/dev/null; \
	  rc=$$?; if [ -n "$$made" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; \
	fi

bench: bench-deps

# One lab per part; each part merges its records into build/bench.json.
bench: venv bpf
	$(PY) -m bench.run
	$(PY) -m bench.fastpath
	$(PY) -m bench.mobility
	$(PY) -m bench.routing
	$(PY) -m bench.dns
	$(PY) -m bench.hardening
	$(PY) -m bench.restarts
	$(PY) -m bench.byname
	$(PY) -m bench.pathnet
	$(PY) -m bench.realnet
	$(PY) -m bench.memory
	$(PY) -m bench.udp

clean:
	-$(PY) -m lab.cleanup
	rm -rf build

distclean: clean
	rm -rf $(VENV) *.egg-info
