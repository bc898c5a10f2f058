# syntax=docker/dockerfile:1
# loraforge: one image for the API (and its inference), the migration job and the worker.
#
# CPU image (this file's default; docker-compose.cpu.yml):
#   docker build -t loraforge:cpu .
# GPU image (docker-compose.yml: the API and the worker): same file, CUDA torch wheels. The
# wheels bundle the CUDA runtime, so only the host's NVIDIA driver and the NVIDIA Container
# Toolkit are needed; pick the cu12x index whose CUDA version the host driver supports
# (nvidia-smi shows it):
#   docker build -t loraforge:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAFORGE_DATA_DIR=/data \
    HF_HOME=/hf-cache

# 1. torch first, from the chosen wheel index, so `pip install .` finds it satisfied
#    instead of pulling the default (CUDA) build from PyPI. Cached across code changes.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app

# 2. The other dependencies, from pyproject.toml alone (stub packages), so this layer
#    is rebuilt only when the dependencies change.
COPY pyproject.toml README.md* ./
RUN test -f README.md || touch README.md \
    && mkdir -p app worker && touch app/__init__.py worker/__init__.py \
    && pip install . \
    && pip uninstall -y loraforge \
    && rm -rf app worker build ./*.egg-info

# 3. The code. Installed in place (editable, no deps) so /app keeps alembic.ini and
#    migrations/ next to the package for `loraforge db upgrade`.
COPY . .
RUN pip install --no-deps -e . \
    && python -m compileall -q app worker

# Non-root user; /data (this container's scratch and adapter cache; artifacts live in the
# object store) and /hf-cache (HF_HOME, hub downloads) are owned by it so a fresh volume
# mounted there inherits the ownership.
RUN useradd --create-home --uid 1000 --user-group loraforge \
    && mkdir -p /data /hf-cache \
    && chown loraforge:loraforge /data /hf-cache
USER loraforge
VOLUME ["/data", "/hf-cache"]

EXPOSE 8000
CMD ["loraforge", "api", "--host", "0.0.0.0", "--port", "8000"]
