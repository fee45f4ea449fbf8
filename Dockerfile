# stagediff on CPU: encode and score workers (python -m tasks.worker --stages encode,score), generate/sweep
# runs (a process worker on cpu-pool), and the Kubernetes worker of an ephemeral tpu-pool.
# Build from the repository root:  docker build -t stagediff .   (Dockerfile.tpu: the TPU variant)
FROM python:3.11-slim

# The CPU wheel of torch first, as `make venv` does: never let the resolver pull a CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=kubernetes

RUN useradd --create-home --uid 1000 stagediff \
    && mkdir -p /cache/models /cache/jax /cache/digests /cache/huggingface \
    && chown -R stagediff:stagediff /cache
WORKDIR /app
COPY pyproject.toml requirements.lock README.md prefect.yaml ./
COPY stagediff stagediff
COPY tpu_ops tpu_ops
COPY flows flows
COPY tasks tasks
RUN python -m venv /app/.venv \
    && /app/.venv/bin/pip install --no-cache-dir --upgrade pip \
    && /app/.venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0 \
    && /app/.venv/bin/pip install --no-cache-dir -c requirements.lock -e ".[$EXTRAS]"

# The venv first on PATH: `prefect`, `stagediff` and `python` in the pod's commands are the venv's.
ENV PATH=/app/.venv/bin:$PATH \
    STAGEDIFF_MODEL_CACHE=/cache/models \
    STAGEDIFF_COMPILE_CACHE=/cache/jax \
    STAGEDIFF_DIGEST_CACHE=/cache/digests \
    HF_HOME=/cache/huggingface \
    PYTHONUNBUFFERED=1
VOLUME ["/cache"]
USER stagediff
# No ENTRYPOINT: Kubernetes `command`/`args` and Prefect's job template replace this command whole.
CMD ["python", "-m", "tasks.worker", "--stages", "encode,score"]
