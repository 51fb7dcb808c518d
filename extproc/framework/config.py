"""The gateway's configuration: one YAML file, validated at start-up.

Nothing here is read at import time: :func:`load_config` is called by the commands, and a bad
file fails start-up with :class:`ConfigError` naming the key (``tiers.small.kind: ...``).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from extproc import environment
from extproc.upstreams import registry

CONFIG_ENV = environment.CONFIG


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Strict):
    """Where and how the ext_proc gRPC service listens."""

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    workers: int = Field(0, ge=0, description="worker processes on the port; 0 means one per core")
    worker_sockets: str | None = Field(None, description="a directory: worker i also listens on the Unix socket "
                                       "<dir>/extproc-<i>.sock, one Envoy endpoint per worker (see README)")
    grace_seconds: float = Field(10.0, ge=0, description="how long SIGTERM waits for in-flight streams")
    max_streams_per_worker: int = Field(100_000, ge=0, description="a worker that has handled about this many "
                                        "streams (+-10 %, so workers do not recycle together) drains and is "
                                        "replaced: bounds grpcio's native leak of ~100 B per stream Envoy "
                                        "resets (README, 'Memory under sustained load'); 0 = never")
    max_request_bytes: int = Field(16 * 1024 * 1024, gt=0, description="larger request bodies get 413")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics of every worker, served by "
                              "the parent process on host:metrics_port; 0 = off")
    triton_metrics_url: str | None = Field(None, description="Triton's Prometheus endpoint: per-tier queue depth "
                                           "and GPU memory on /metrics, and GPU-hour cost apportioning")
    blas_threads: int = Field(1, ge=0, description="BLAS threads per worker process (NumPy: the embedder, "
                              "vector search); 0 = the library's choice (one per core); an explicit "
                              "OPENBLAS_NUM_THREADS wins (extproc/serving/blas_threads.py)")


class Price(_Strict):
    """USD per 1,000 tokens."""

    prompt_per_1k: float = Field(0.0, ge=0)
    completion_per_1k: float = Field(0.0, ge=0)
    gpu_hour_usd: float = Field(0.0, ge=0, description="instead of per-token prices: USD per GPU-hour, apportioned "
                                "to requests by the compute time Triton reports (see extproc/observability/cost_model.py)")
    gpus: float = Field(1.0, gt=0, description="GPUs serving the tier (GPU-hour pricing)")

    @model_validator(mode="after")
    def _one_cost_model(self) -> "Price":
        if self.gpu_hour_usd and (self.prompt_per_1k or self.completion_per_1k):
            raise ValueError("gpu_hour_usd: give either per-1K token prices or a GPU-hour price, not both")
        return self


class TierConfig(_Strict):
    """A model tier: what serves it and how the gateway talks to it.

    The tier's name is the value of the ``x-extproc-tier`` header that Envoy's routes match.
    """

    model: str = Field(description="the upstream's model name (Triton model or OpenAI model)")
    kind: str = Field("triton", description="the upstream kind (extproc.upstreams.registry): triton, openai")
    cluster: str | None = Field(None, description="the Envoy cluster its route sends to (informational)")
    aliases: list[str] = Field(default_factory=list, description="public model names pinned to this tier")
    chat_template: str = "chatml"
    tokenizer: str = "cl100k_base"
    context_window: int = Field(4096, gt=0)
    default_max_tokens: int = Field(256, gt=0)
    price: Price = Field(default_factory=Price)
    capabilities: list[str] = Field(default_factory=list)
    api_key_env: str | None = Field(
        None, description="environment variable holding the upstream's API key (kind openai), sent as "
        "Authorization: Bearer; read when the gateway starts")
    forward_authorization: bool = Field(
        False, description="pass the client's Authorization header to the upstream unchanged (for an "
        "upstream that authenticates end users itself); otherwise it is removed, so a client's gateway "
        "credentials never reach an upstream")

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> "TierConfig":
        if self.api_key_env and not registry.UPSTREAMS[self.kind].takes_api_key:
            raise ValueError(f"api_key_env is only for kind {' / '.join(registry.kinds_taking_api_keys())} "
                             f"({self.kind} takes no API key)")
        if self.api_key_env and self.forward_authorization:
            raise ValueError("api_key_env and forward_authorization exclude each other")
        return self

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in registry.UPSTREAMS:
            raise ValueError(f"unknown upstream kind {value!r} (known: {', '.join(registry.known_kinds())})")
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        from extproc.formats.chat_templates import TEMPLATES

        if value not in TEMPLATES:
            raise ValueError(f"unknown chat template {value!r}; known: {', '.join(sorted(TEMPLATES))}")
        return value


class PluginEntry(_Strict):
    """One plugin to load, in call order, with its settings and its failure policy."""

    name: str
    enabled: bool = True
    on_error: Literal["fail_closed", "fail_open"] = Field(
        "fail_closed",
        description="fail_closed refuses the request with a 500 when the plugin raises; "
        "fail_open logs, counts and flags it (x-extproc-degraded) and goes on without it",
    )
    settings: dict[str, Any] = Field(default_factory=dict)


class StateConfig(_Strict):
    """Where shared state lives: in memory (one process) or Redis (shared by every worker and gateway)."""

    redis_url: str | None = None
    key_prefix: str = "extproc:"


class CostsConfig(_Strict):
    """Costs beyond the tiers' token prices, split out in usage records and metrics."""

    gateway_cpu_hour_usd: float = Field(0.0, ge=0, description="gateway overhead: USD per CPU-hour of gateway time")
    embedding_call_usd: float = Field(0.0, ge=0, description="USD per embedding call a policy made")
    retry_headers: list[str] = Field(default_factory=lambda: ["x-stainless-retry-count", "x-retry-attempt"],
                                     description="request headers whose value > 0 marks a client retry")


class EmbeddingsConfig(_Strict):
    """Where the worker computes prompt embeddings (the routers', the semantic cache's): one choice
    per process (extproc/embeddings/prompt.py)."""

    backend: Literal["local", "triton"] = Field("local", description="local: MiniLM in the worker (runtime below); "
                                                "triton: Triton's embedder model (same vectors; GPUs in production)")
    runtime: Literal["auto", "numpy", "onnxruntime", "onnxruntime-int8"] = Field(
        "auto", description="the in-worker encoder's runtime (backend local, and the fallback): auto is "
        "onnxruntime when installed, else numpy (same vectors); onnxruntime-int8 moves them (cosine >= 0.98); "
        "$EXTPROC_EMBEDDINGS_RUNTIME is used when this is auto (extproc/embeddings/encoder.py)")
    triton_url: str = Field("http://127.0.0.1:8000", description="Triton's HTTP endpoint (backend triton)")
    triton_model: str = Field("embedder", description="the Triton model (triton_models/embedder)")
    timeout_seconds: float = Field(2.0, gt=0, description="a batch Triton has not answered by then counts as a failure")
    on_unavailable: Literal["local", "fail"] = Field(
        "local", description="Triton's embedder down, not loaded or too slow: local computes in the worker "
        "(the request is served as before; the worker loads MiniLM at start-up for it), fail raises to the "
        "policy that asked (its on_error decides: fail_open goes on without it, flagged x-extproc-degraded)")
    retry_seconds: float = Field(2.0, ge=0, description="after a failure, Triton is not asked again for this long")
    batch_in_gateway: bool = Field(True, description="true: a worker's concurrent prompts go to Triton as one "
                                   "request (the batcher); false: one request each, merged by Triton's dynamic "
                                   "batcher only")

    @field_validator("triton_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith("http://"):
            raise ValueError(f"expected http://host:port, got {value!r}")
        return value.rstrip("/")


class GatewayConfig(_Strict):
    """The whole gateway configuration."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    tiers: dict[str, TierConfig]
    default_tier: str
    auto_model: str = Field("auto", description="the model name that asks the gateway to choose a tier")
    plugins: list[PluginEntry] | None = Field(
        None, description="plugins in call order; omitted means the built-in defaults"
    )
    state: StateConfig = Field(default_factory=StateConfig)
    costs: CostsConfig = Field(default_factory=CostsConfig)
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)

    @model_validator(mode="after")
    def _check_references(self) -> "GatewayConfig":
        if not self.tiers:
            raise ValueError("tiers: at least one tier is needed")
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier: {self.default_tier!r} is not one of the tiers ({', '.join(self.tiers)})")
        seen: dict[str, str] = {}
        for name, tier in self.tiers.items():
            for alias in (name, *tier.aliases):
                if alias in seen and seen[alias] != name:
                    raise ValueError(f"tiers.{name}.aliases: {alias!r} already names tier {seen[alias]!r}")
                seen[alias] = name
        if self.auto_model in seen:
            raise ValueError(f"auto_model: {self.auto_model!r} is also a tier name or alias")
        for name, tier in self.tiers.items():
            if tier.price.gpu_hour_usd and not self.server.triton_metrics_url:
                raise ValueError(f"tiers.{name}.price.gpu_hour_usd: GPU-hour pricing needs server.triton_metrics_url")
        return self


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> GatewayConfig:
    """Validate an already-parsed YAML document."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping, not {type(data).__name__}")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def default_config_text() -> str:
    """The embedded default configuration (the one ``extproc up`` runs with)."""
    return resources.files("extproc.framework").joinpath("default_config.yaml").read_text()


def load_config(path: str | os.PathLike | None = None, *, overrides: dict | None = None) -> GatewayConfig:
    """Load and validate the configuration.

    :param path: a YAML file; ``None`` uses ``$EXTPROC_CONFIG`` or else the embedded default.
    :param overrides: nested keys to set after reading (command-line flags), e.g. ``{"server": {"port": 1}}``.
    """
    path = path or environment.config_path()
    if path:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    else:
        source, text = "<embedded default>", default_config_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if overrides and isinstance(data, dict):
        data = _merge(data, overrides)
    return parse_config(data, source)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
