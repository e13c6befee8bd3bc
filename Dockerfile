# One image for every role: client gateway, server gateway, service router, resolver
# (`serval gateway client|server`, `serval router`, `serval dns`; `serval ctl` to look
# inside). docker-compose.yml at the root runs a whole deployment from it.
#
#   docker build -t serval:local .
#   docker build --build-arg BASE_IMAGE=debian:bookworm-slim -t serval:local .
#
# The base is the official debian:bookworm-slim by default. Where no registry is
# reachable, `deploy/build-base-image.sh` makes that very image locally (debootstrap +
# docker import, under the same tag), and builds the Python wheels on the host into
# build/wheels, which this file then uses instead of the package index.
ARG BASE_IMAGE=debian:bookworm-slim

# --- build: a virtual environment with the dependencies and the project ---------------
FROM ${BASE_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# Wheels made on the host (build/wheels) when there are any; the wildcard lets the
# folder be absent, and setup.cfg is there to read the requirements from.
COPY setup.cfg build/wheel[s] /tmp/wheels/
RUN set -eu; \
    python3 -m venv /opt/serval; \
    reqs=$(python3 -c 'import configparser; c = configparser.ConfigParser(); c.read("/tmp/wheels/setup.cfg"); print(" ".join(r.strip() for r in c["options"]["install_requires"].splitlines() if r.strip()))'); \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
        /opt/serval/bin/pip install --no-index --find-links /tmp/wheels $reqs setuptools wheel; \
    else \
        apt-get update; \
        apt-get install -y --no-install-recommends build-essential python3-dev libnetfilter-queue-dev; \
        /opt/serval/bin/pip install $reqs setuptools wheel; \
    fi
COPY setup.cfg pyproject.toml README.md /src/
COPY sal /src/sal
COPY gateway /src/gateway
COPY nat /src/nat
COPY router /src/router
COPY dns_resolver /src/dns_resolver
COPY serval /src/serval
COPY lab /src/lab
# The kernel fast path: `make` compiles it on the host (gateway/fastpath/bpf/serval_tc.o,
# copied in above); where it did not, clang compiles it here.
RUN set -eu; obj=/src/gateway/fastpath/bpf/serval_tc.o; \
    if [ ! -e "$obj" ] || [ "$obj" -ot /src/gateway/fastpath/bpf/serval_tc.c ]; then \
        apt-get update; apt-get install -y --no-install-recommends clang libbpf-dev gcc; \
        clang -O2 -g -Wall -target bpf -I/usr/include/$(gcc -dumpmachine) \
            -c /src/gateway/fastpath/bpf/serval_tc.c -o "$obj"; \
    fi
RUN /opt/serval/bin/pip install --no-index --no-deps --no-build-isolation /src \
 && /opt/serval/bin/pip uninstall -y setuptools wheel \
 && /opt/serval/bin/python -m compileall -q /opt/serval/lib

# --- the image ---------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# iptables (nft) and libnetfilter-queue for the interception; curl for the checks and the
# stand-in legacy client of docker-compose.yml.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 iptables libnetfilter-queue1 libbpf1 iproute2 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/serval --shell /usr/sbin/nologin serval \
 && install -d -o serval -g serval -m 0755 /var/lib/serval \
 && install -d -o root -g serval -m 2770 /run/serval-ctl \
 && install -d -m 0700 /run/serval
COPY --from=build /opt/serval /opt/serval
ENV PATH=/opt/serval/bin:$PATH PYTHONUNBUFFERED=1
# Unprivileged by default (the resolver, the stand-ins). The gateways and the router need
# root in their container with NET_ADMIN and NET_RAW (iptables, NFQUEUE, raw sockets), and
# the gateways BPF for the kernel fast path: docker-compose.yml sets `user: root` and
# those capabilities, nothing more.
USER serval
WORKDIR /var/lib/serval
CMD ["serval", "--help"]
