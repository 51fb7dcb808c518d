"""Triton Python-backend adapter: the ``TritonPythonModel`` behind llm-small/medium/large.

Decoupled model.  ``execute()`` only parses each request and hands it to the :class:`Engine`,
whose background thread does in-flight batching and sends responses through each request's
response sender:

* ``stream`` true: one response per generated token (``text_output`` = new text), the last one
  carrying ``finish_reason``, sent with ``TRITONSERVER_RESPONSE_COMPLETE_FINAL``;
* otherwise exactly one response with the whole text (what Triton's HTTP ``/generate`` needs).

Config ``parameters``: ``tier`` (small|medium|large; default from the model name),
``max_active_sequences`` (in-flight batch limit; 1 = batching off) and ``blas_threads`` (see
:mod:`.blas_threads`).  The environment variables ``EXTPROC_LLM_MAX_ACTIVE_SEQUENCES`` (all tiers)
and ``EXTPROC_LLM_MAX_ACTIVE_SEQUENCES_<SMALL|MEDIUM|LARGE>`` override the batch limit at launch,
``EXTPROC_LLM_BLAS_THREADS(_<TIER>)`` the thread count.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from .blas_threads import blas_thread_limit, limit_blas_threads
from .engine import DEFAULT_MAX_TOKENS, Engine, Event, GenRequest
from .launch_env import tier_override
from .tokenizer import EOS_ID

#: How stale the custom metrics (the queue gauges above all) may get while the engine is busy.
METRICS_REFRESH_SECONDS = 0.2


def _param(config: dict, key: str, default: str | None = None) -> str | None:
    v = config.get("parameters", {}).get(key)
    if isinstance(v, dict):
        v = v.get("string_value")
    return v if v not in (None, "") else default


def _scalar(request, name: str, default=None):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    arr = t.as_numpy().reshape(-1)
    if arr.size == 0:
        return default
    return arr[0]


def _as_str(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return str(v)


def parse_request(request) -> tuple[GenRequest, bool]:
    text = pb_utils.get_input_tensor_by_name(request, "text_input")
    if text is None:
        raise ValueError("missing required input 'text_input'")
    arr = text.as_numpy().reshape(-1)
    if arr.size != 1:
        raise ValueError(f"text_input must hold exactly one string, got {arr.size}")
    stop = pb_utils.get_input_tensor_by_name(request, "stop_words")
    stop_words = [_as_str(s) for s in stop.as_numpy().reshape(-1)] if stop is not None else []
    seed = _scalar(request, "random_seed")
    end_id = _scalar(request, "end_id")
    req = GenRequest(
        prompt=_as_str(arr[0]),
        max_tokens=int(_scalar(request, "max_tokens", DEFAULT_MAX_TOKENS)),
        temperature=float(_scalar(request, "temperature", 0.0)),
        top_p=float(_scalar(request, "top_p", 1.0)),
        top_k=int(_scalar(request, "top_k", 0)),
        seed=int(seed) if seed is not None else None,
        stop_words=[w for w in stop_words if w],
        end_id=int(end_id) if end_id is not None else EOS_ID,
    )
    if req.top_p <= 0.0:  # TRT-LLM treats 0 as "off"
        req.top_p = 1.0
    return req.validate(), bool(_scalar(request, "stream", False))


def _response(text: str, ev: Event):
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([[ev.prompt_tokens]], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([[ev.completion_tokens]], dtype=np.int32)),
            pb_utils.Tensor("finish_reason", np.array([[ev.finish_reason.encode()]], dtype=np.object_)),
        ]
    )


#: the sender thread asks Triton whether a request was cancelled every this many tokens
CANCEL_POLL_EVERY = 8


class _SendQueue:
    """Builds and sends responses on its own thread, in order, and polls for cancellation.

    Creating a response and handing it to Triton is an IPC round trip, and so is asking whether
    the client went away (``is_cancelled()``, ~0.2 ms).  Doing both here keeps them off the
    engine thread, which starts the next decode step meanwhile (NumPy releases the GIL inside
    BLAS); the engine only reads the flag this thread sets (:meth:`_Responder.is_cancelled`).
    """

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"{name}-sender", daemon=True)
        self._thread.start()

    def put(self, responder: "_Responder", text: str, ev: Event | BaseException | None) -> None:
        """Queue a response (``ev`` an :class:`Event`), an error (an exception; ``text`` is the
        message) or, with ``ev`` None, just a cancellation poll for ``responder``."""
        self._q.put((responder, text, ev))

    def _run(self) -> None:
        final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        while True:
            item = self._q.get()
            if item is None:
                return
            responder, text, ev = item
            sender = responder.sender
            try:
                if ev is None:
                    responder.cancelled = bool(sender.is_cancelled())
                elif isinstance(ev, BaseException):
                    _send_error(sender, text)
                else:
                    final = bool(ev.finish_reason)
                    sender.send(_response(text, ev), flags=final_flag if final else 0)
                    if not final and ev.completion_tokens % CANCEL_POLL_EVERY == 0:
                        responder.cancelled = bool(sender.is_cancelled())
            except Exception as exc:  # client gone, server shutting down, ...
                responder.cancelled = True
                pb_utils.Logger.log_verbose(f"reference_llm: response not sent: {exc!r}")

    def close(self, timeout: float = 5.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)


class _Responder:
    """Turns engine events into Triton responses for one request."""

    __slots__ = ("sender", "stream", "parts", "out", "cancelled")

    def __init__(self, sender, stream: bool, out: _SendQueue) -> None:
        self.sender = sender
        self.stream = stream
        self.parts: list[str] = []
        self.out = out
        self.cancelled = False  # set by the sender thread

    def __call__(self, ev: Event) -> None:
        if self.stream:
            self.out.put(self, ev.text, ev)
            return
        self.parts.append(ev.text)
        if ev.final:
            self.out.put(self, "".join(self.parts), ev)
        elif ev.completion_tokens % CANCEL_POLL_EVERY == 0:
            self.out.put(self, "", None)  # nothing to send yet: only ask about cancellation

    def is_cancelled(self) -> bool:
        return self.cancelled


def _send_error(sender, message: str) -> None:
    sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", config.get("name", "llm"))
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(f"{self.model_name} must be decoupled")
        tier = _param(config, "tier", self.model_name)
        max_active = int(_param(config, "max_active_sequences", "32"))
        override = tier_override("EXTPROC_LLM_MAX_ACTIVE_SEQUENCES", str(tier))
        if override is not None:
            max_active = int(override[1])
        self.blas_threads = self._limit_blas_threads(config, str(tier))
        self.engine = Engine(tier, max_active_sequences=max_active)
        self._out = _SendQueue(self.model_name)
        self.engine.on_idle = self._flush_metrics
        self.engine.on_busy_step = self._flush_metrics_if_stale
        self.engine.on_error = self._on_engine_error
        self._init_metrics()
        self._flush_metrics()  # the gauges (blas_threads, queue depths) exist before any traffic
        self.engine.start()
        pb_utils.Logger.log_info(
            f"{self.model_name}: reference LLM tier={self.engine.cfg.name} d={self.engine.cfg.d_model} "
            f"layers={self.engine.cfg.n_layers} max_active_sequences={self.engine.max_active} "
            f"blas_threads={self.blas_threads if self.blas_threads is not None else 'unknown'}"
        )

    def _limit_blas_threads(self, config: dict, tier: str) -> int | None:
        """Apply the ``blas_threads`` setting; returns the BLAS's thread count (None: unknown).

        A bad value fails the model load; a missing ``threadpoolctl`` only warns (the model
        still serves, with the BLAS library's own thread count), loudly, in Triton's log.
        """
        try:
            wanted = blas_thread_limit(_param(config, "blas_threads"), tier)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{self.model_name}: {exc}") from None
        try:
            return limit_blas_threads(wanted)
        except ImportError as exc:
            pb_utils.Logger.log_warn(
                f"{self.model_name}: blas_threads={wanted} not applied ({exc!r}): "
                "install threadpoolctl in the model's Python environment"
            )
            return None

    # -- metrics (Triton /metrics, custom families) -----------------------------------------
    def _init_metrics(self) -> None:
        self._metrics = {}
        self._reported: dict[str, float] = {}
        self._last_flush = 0.0
        self._metrics_lock = threading.Lock()
        try:
            labels = {"model": self.model_name}
            defs = {
                "decode_steps": ("reference_llm_decode_steps_total", "Batched decode forward passes", "counter"),
                "decode_tokens": ("reference_llm_decode_tokens_total",
                                  "Tokens produced by batched decode steps (tokens/steps = mean batch)", "counter"),
                "prefills": ("reference_llm_prefills_total", "Prompts prefilled", "counter"),
                "generated_tokens": ("reference_llm_generated_tokens_total", "Tokens generated", "counter"),
                "max_batch": ("reference_llm_max_decode_batch", "Largest decode batch seen", "gauge"),
                # The queue a load-aware router reads: a decoupled model takes every request at
                # once, so Triton's own pending count stays 0 however loaded the engine is.
                "waiting": ("reference_llm_waiting_requests",
                            "Requests accepted but waiting for a free sequence slot", "gauge"),
                "active": ("reference_llm_active_sequences", "Sequences being generated now", "gauge"),
                "blas_threads": ("reference_llm_blas_threads",
                                 "BLAS threads of the model's process (0: unknown)", "gauge"),
                "t_prefill": ("reference_llm_prefill_seconds_total",
                              "Time spent in forward passes of joining prompts alone (no sequence decoding)", "counter"),
                "t_decode": ("reference_llm_decode_seconds_total",
                             "Time spent in batched decode forward passes (joining prompts fused in included)", "counter"),
                "t_emit": ("reference_llm_emit_seconds_total",
                           "Time spent sampling, detokenizing and sending responses after decode steps", "counter"),
            }
            for key, (name, desc, kind) in defs.items():
                fam = pb_utils.MetricFamily(
                    name=name, description=desc,
                    kind=pb_utils.MetricFamily.COUNTER if kind == "counter" else pb_utils.MetricFamily.GAUGE,
                )
                self._metrics[key] = (fam, fam.Metric(labels=labels), kind)
        except Exception as exc:  # metrics are a nicety; never fail the model for them
            pb_utils.Logger.log_warn(f"{self.model_name}: custom metrics unavailable: {exc!r}")
            self._metrics = {}

    def _flush_metrics_if_stale(self) -> None:
        """While busy: refresh the metrics (the queue gauges) at most every METRICS_REFRESH_SECONDS."""
        if self._metrics and time.monotonic() - self._last_flush > METRICS_REFRESH_SECONDS:
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        if not self._metrics:
            return
        with self._metrics_lock:
            self._flush_metrics_locked()

    def _flush_metrics_locked(self) -> None:
        stats = dict(self.engine.stats)
        stats["max_batch"] = self.engine.max_batch_seen
        stats["waiting"], stats["active"] = self.engine.queue_depths()
        stats["blas_threads"] = self.blas_threads or 0
        for k, v in dict(self.engine.timings).items():
            stats["t_" + k] = v
        for key, (_fam, metric, kind) in self._metrics.items():
            value = float(stats.get(key, 0))
            if kind == "gauge":
                metric.set(value)
            else:
                delta = value - self._reported.get(key, 0.0)
                if delta > 0:
                    metric.increment(delta)
            self._reported[key] = value
        self._last_flush = time.monotonic()

    def _on_engine_error(self, exc: BaseException, callback) -> None:
        if isinstance(callback, _Responder):
            self._out.put(callback, f"generation failed: {exc!r}", exc)

    # -- requests ---------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                gen, stream = parse_request(request)
                responder = _Responder(sender, stream, self._out)
                self.engine.submit(gen, responder, responder.is_cancelled)
            except Exception as exc:  # bad input -> an error response, never a hang
                _send_error(sender, str(exc))
        return None  # the engine thread refreshes the metrics (on_busy_step / on_idle)

    def finalize(self) -> None:
        self.engine.stop()
        self._out.close()
        try:
            self._flush_metrics()
        except Exception:
            pass
