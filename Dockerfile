# pgtwist's container image.
#   docker build -t pgtwist:0.1.0 .
#   docker run --rm -p 6432:6432 -v $PWD/my.toml:/etc/pgtwist/pgbalance.toml:ro pgtwist:0.1.0
#   docker run --rm pgtwist:0.1.0 --version          # (and check --config ..., passwd app, example-config)
# The entry point is the `pgtwist` command under tini; the default command runs the config at
# /etc/pgtwist/pgbalance.toml. SIGTERM drains (shutdown_timeout), then the process exits 0.
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for the compiled core (setup.py, pgtwist/compiled.py); the image itself needs none.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.cfg setup.py README.md LICENSE ./
COPY etc/pgbalance.toml etc/pgbalance.toml
COPY twisted twisted
COPY pgtwist pgtwist
# Then Twisted's plugin cache (twisted/plugins/dropin.cache), built now: at run time the root
# filesystem is read-only, and twistd would log a failure to write it at every start.
RUN python -m venv /opt/pgtwist \
 && /opt/pgtwist/bin/pip install . \
 && /opt/pgtwist/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && test -s /opt/pgtwist/lib/python*/site-packages/twisted/plugins/dropin.cache

FROM python:${PYTHON_VERSION}-slim-bookworm
# tini as PID 1: it forwards SIGTERM/SIGHUP to pgtwist and reaps zombies (PID 1 gets no
# default signal handlers from the kernel).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 pgtwist \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/pgtwist --create-home --shell /usr/sbin/nologin pgtwist \
 && mkdir -p /etc/pgtwist
COPY --from=build /opt/pgtwist /opt/pgtwist
COPY etc/pgbalance.toml /etc/pgtwist/pgbalance.toml.example
ENV PATH=/opt/pgtwist/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/pgtwist
EXPOSE 6432 9127
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "pgtwist"]
CMD ["run", "--config", "/etc/pgtwist/pgbalance.toml"]
