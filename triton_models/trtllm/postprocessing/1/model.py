"""postprocessing: token ids from tensorrt_llm -> the gateway's output contract.

Inputs (batched):
  TOKENS_BATCH INT32 [-1, -1] (beams x tokens; generated tokens only: tensorrt_llm runs with
  exclude_input_in_output=true), SEQUENCE_LENGTH INT32 [-1] (per beam),
  INPUT_LENGTH INT32 [1] (preprocessing's REQUEST_INPUT_LEN), MAX_TOKENS INT32 [1],
  END_ID INT32 [1] (optional), STOP_WORDS STRING [-1] (optional), STREAM BOOL [1] (optional).
Outputs:
  OUTPUT STRING [1] (beam 0), PROMPT_TOKENS INT32 [1], COMPLETION_TOKENS INT32 [1],
  FINISH_REASON STRING [1].

Non-streaming (one tensorrt_llm response holding every generated token) the outputs are exact:
completion_tokens = tokens generated (end token excluded), finish_reason "length" when
max_tokens were generated, else "stop"; text after a stop word is cut (OpenAI semantics).

Streaming through the ensemble, every tensorrt_llm response reaches this model as a separate
request that carries only the new tokens.  To make text deltas, cumulative counts and the finish
reason right, state is kept per Triton request id (the ensemble scheduler gives every composing
request the id of the client's request): the gateway must send a unique request id.  A stream
whose end is only signalled by Triton's final flag (end token not returned) cannot be seen here:
its last response keeps finish_reason "" (treat end-of-stream as "stop").  The tensorrt_llm_bls
model sees the final flag and is the recommended entry point for streaming; see README.md.
"""

import json
import os
import sys
import threading
import time
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from textstream import GenerationState  # noqa: E402

_MAX_STREAMS = 4096
_STREAM_TTL_S = 600.0


def _param(model_config, key, default=None):
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    if value is None or value == "" or value.startswith("${"):
        return default
    return value


def _optional(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        tokenizer_dir = _param(model_config, "tokenizer_dir")
        if not tokenizer_dir:
            raise pb_utils.TritonModelException("postprocessing: parameter tokenizer_dir is not set")
        skip = _param(model_config, "skip_special_tokens", "true")
        self.skip_special_tokens = skip.lower() in ("1", "true", "t", "yes", "y")
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir, legacy=False, padding_side="left", trust_remote_code=True
        )
        if not self.tokenizer.pad_token:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # request id -> (GenerationState per batch row, last use)
        self._streams = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ stream state

    def _stream_states(self, key, factory):
        now = time.monotonic()
        with self._lock:
            while self._streams:
                oldest_key, (_, used) = next(iter(self._streams.items()))
                if len(self._streams) < _MAX_STREAMS and now - used < _STREAM_TTL_S:
                    break
                del self._streams[oldest_key]
            entry = self._streams.pop(key, None)
            states = entry[0] if entry else factory()
            self._streams[key] = (states, now)
            return states

    def _drop(self, key):
        with self._lock:
            self._streams.pop(key, None)

    # ------------------------------------------------------------------ execute

    def _one(self, request):
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
        seq_len = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
        input_len = pb_utils.get_input_tensor_by_name(request, "INPUT_LENGTH").as_numpy().reshape(-1)
        max_tokens = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS").as_numpy().reshape(-1)
        end_id = _optional(request, "END_ID")
        stop_words = _optional(request, "STOP_WORDS")
        stream = _optional(request, "STREAM")
        batch = tokens.shape[0]
        streaming = stream is not None and bool(np.asarray(stream).reshape(-1)[0])

        def make_states():
            states = []
            for b in range(batch):
                words = []
                if stop_words is not None:
                    words = [w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in stop_words[b]]
                states.append(
                    GenerationState(
                        self.tokenizer,
                        max_tokens=int(max_tokens[b]),
                        end_id=None if end_id is None else int(np.asarray(end_id).reshape(-1)[b]),
                        stop_words=words,
                        skip_special_tokens=self.skip_special_tokens,
                    )
                )
            return states

        key = request.request_id() if streaming else ""
        if streaming and key:
            states = self._stream_states(key, make_states)
        else:
            states = make_states()

        texts, completions, reasons = [], [], []
        for b in range(batch):
            n = int(np.asarray(seq_len[b]).reshape(-1)[0])
            ids = tokens[b][0][:n]  # beam 0
            text, completion, reason = states[b].feed(ids, final=not streaming)
            texts.append([text.encode("utf-8")])
            completions.append([completion])
            reasons.append([reason.encode("utf-8")])
        if streaming and key and all(s.finished for s in states):
            self._drop(key)

        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("OUTPUT", np.array(texts, dtype=np.object_)),
                pb_utils.Tensor("PROMPT_TOKENS", input_len.reshape(batch, 1).astype(np.int32)),
                pb_utils.Tensor("COMPLETION_TOKENS", np.array(completions, dtype=np.int32)),
                pb_utils.Tensor("FINISH_REASON", np.array(reasons, dtype=np.object_)),
            ]
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as exc:
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"postprocessing: {exc}"))
                )
        return responses

    def finalize(self):
        self._streams.clear()
