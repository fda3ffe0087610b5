# nettester: every role of every installed module; the entrypoint is the
# `nettester` console script, so `docker run nettester:latest keepalive-server`
# and Kubernetes `args: ["keepalive-server", ...]` run the same service as
# `twistd -n nettester keepalive-server`.
#
# BASE_IMAGE: any Debian 12 with python3 and python3-venv. The default is the
# official image; CI builds from a local mmdebstrap root file system
# (tests/test_image.py). Dependencies are pinned by constraints.txt (README,
# "Kubernetes and the container image", says how to refresh it).
ARG BASE_IMAGE=python:3.11-slim-bookworm
# EXTRAS: setup.cfg extras to install too, e.g. --build-arg EXTRAS=plots for
# `nettester plot` (matplotlib, pinned by constraints.txt as well).
ARG EXTRAS=

FROM ${BASE_IMAGE} AS build
ARG EXTRAS
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY setup.cfg pyproject.toml README.md LICENSE constraints.txt ./
COPY nettester ./nettester
COPY twisted ./twisted
RUN python3 -m venv /opt/nettester \
 && /opt/nettester/bin/pip install --constraint constraints.txt ".${EXTRAS:+[${EXTRAS}]}"

FROM ${BASE_IMAGE}
# MPLCONFIGDIR: matplotlib's cache (EXTRAS=plots) where uid 10001 may write; its HOME is /nonexistent.
ENV PATH=/opt/nettester/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
COPY --from=build /opt/nettester /opt/nettester
# Regenerate the plugin caches (twistd's twisted/plugins and nettester's
# modules) now, as root: at run time the image is read-only and unprivileged,
# and a stale cache would be rebuilt on every start. The user is written
# into /etc/passwd directly: a minimal Debian has no useradd.
RUN python3 -c "import nettester.plugins, twisted.plugins; \
from twisted.plugin import IPlugin, getPlugins; \
from nettester.interfaces import IProtocolModule; \
list(getPlugins(IPlugin, twisted.plugins)); \
modules = list(getPlugins(IProtocolModule, nettester.plugins)); \
assert modules, 'no nettester module found'; \
print('modules:', ', '.join(sorted(m.name for m in modules)))" \
 && nettester --help > /dev/null \
 && echo 'nettester:x:10001:10001:nettester:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'nettester:x:10001:' >> /etc/group
USER 10001:10001
# keepalive 49665/tcp; STUN 3478/udp+tcp; CoAP coap 5683, coaps 5684, extended
# 5783/5784 (the cluster's DTLS port); cluster management 5884/udp; NAT console
# 5799/tcp; coap-server --ready-port 8080/tcp; --metrics-port (and /ready) 9100/tcp.
EXPOSE 49665/tcp 3478/udp 3478/tcp 5683/udp 5684/udp 5783/udp 5784/udp 5884/udp 5799/tcp 8080/tcp 9100/tcp
ENTRYPOINT ["nettester"]
CMD ["--help"]
