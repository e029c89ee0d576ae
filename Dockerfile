# syntax=docker/dockerfile:1
# GPU device plugin image: an sh entry point running supervisord, which runs health-monitor,
# plugin-server and registrar.
#
# Stage 1 builds the distribution into a self-contained virtual environment; stage 2 copies only
# that environment, so no build tooling, sources or pip caches end up in the final image.

FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Exact versions (scripts/lock_image_deps.py: those the tests ran against), installed before the
# product and without its resolver: two builds of the same commit get the same packages.
COPY requirements-image.txt ./
RUN pip install --no-cache-dir -r requirements-image.txt
# pyproject.toml declares readme = "README.md", so the build needs it next to the sources.
COPY pyproject.toml README.md ./
COPY common/ ./common/
COPY services/ ./services/
COPY protos/ ./protos/
COPY supervisord.conf ./
# The build backend is only for this step, and pip only for the build (16 MB): neither goes into the image.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip uninstall --yes setuptools \
    && python -m pip uninstall --yes pip


FROM python:3.11-slim

# The commit, from the build: docker build --build-arg REVISION=$(git rev-parse HEAD) .
ARG REVISION=unknown
# version: common/version.py's, which packaging reads (a test keeps them equal); gpu-plugin --version and the bus report it too.
LABEL org.opencontainers.image.title="gpu-device-plugin" \
      org.opencontainers.image.description="Kubernetes device plugin for NVIDIA GPUs (Python, supervisord)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${REVISION}"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GPU_PLUGIN_RUN_DIR=/run/gpu-device-plugin

COPY --from=build /opt/venv /opt/venv
COPY supervisord.conf /etc/gpu-plugin/supervisord.conf
# PID 1: creates and checks the run dir, runs supervisord, forwards TERM/INT, and exits non-zero
# with the cause as the last log line when a service fails for good (see the script).
COPY scripts/entrypoint.sh /usr/local/bin/gpu-plugin-entrypoint
# NVIDIA's command names (nvidia-device-plugin, config-manager) are console scripts of the venv, on
# PATH: NVIDIA's chart and the GPU Operator start the containers with them.

# The bus sockets live here (mode 0700: only the container's own processes may use them).
# lsmod: the GPU Operator's device-plugin entrypoint looks for the gdrdrv, nvidia-fs and mofed
# modules with it (NVIDIA's image has busybox's); without it those devices are never given.
# Not pinned (DL3008): the base's Debian release decides kmod's version, and a pin of one release's
# version fails the build on the next (python:3.11-slim moves between releases).
# hadolint ignore=DL3008
RUN install -d -m 0700 /run/gpu-device-plugin \
    && apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kmod >/dev/null \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*

# No USER instruction on purpose: the processes run as root. The kubelet's device-plugins directory
# (/var/lib/kubelet/device-plugins, a hostPath) is owned by root with mode 0755, and the plugin must
# create its sockets there and connect to kubelet.sock. Root here is an unprivileged root: the
# DaemonSet drops ALL capabilities, forbids privilege escalation and is not privileged, exactly like
# NVIDIA's own plugin.

WORKDIR /
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/gpu-plugin-entrypoint", "-c", "/etc/gpu-plugin/supervisord.conf"]
