# nettester: every role of every installed module; the entrypoint is the
# `nettester` console script, so `docker run nettester:latest keepalive-server`
# and Kubernetes `args: ["keepalive-server", ...]` run the same service as
# `twistd -n nettester keepalive-server`.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY setup.cfg pyproject.toml README.md ./
COPY nettester ./nettester
COPY twisted ./twisted
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/nettester \
 && /opt/nettester/bin/pip install /wheels/*.whl

FROM python:3.11-slim-bookworm
ENV PATH=/opt/nettester/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/nettester /opt/nettester
# Regenerate the plugin caches (twistd's twisted/plugins and nettester's
# modules) now, as root: at run time the image is read-only and unprivileged,
# and a stale cache would be rebuilt on every start.
RUN python -c "import nettester.plugins, twisted.plugins; \
from twisted.plugin import IPlugin, getPlugins; \
from nettester.interfaces import IProtocolModule; \
list(getPlugins(IPlugin, twisted.plugins)); \
modules = list(getPlugins(IProtocolModule, nettester.plugins)); \
assert modules, 'no nettester module found'; \
print('modules:', ', '.join(sorted(m.name for m in modules)))" \
 && nettester --help > /dev/null \
 && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent nettester
USER 10001:10001
# 49665 keepalive (TCP/TLS); more modules add their ports.
EXPOSE 49665
ENTRYPOINT ["nettester"]
CMD ["--help"]
