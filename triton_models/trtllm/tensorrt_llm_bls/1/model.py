"""tensorrt_llm_bls: the gateway's LLM contract on top of preprocessing + tensorrt_llm (BLS).

Same inputs/outputs as the ensemble and the CPU tiers (llm-small/-medium/-large):
  text_input STRING [1]; max_tokens INT32 [1]; optional stream, temperature, top_p, top_k,
  random_seed, stop_words, end_id, pad_id  ->  text_output, prompt_tokens, completion_tokens
  (cumulative), finish_reason ("" until the last response, then "stop" or "length").

Flow per request (own thread, so one instance serves many streams at once):
  1. BLS call to ``preprocessing``: token ids, prompt length, stop-word ids, end/pad ids;
  2. decoupled BLS call to ``tensorrt_llm`` (in-flight batching on the GPU), streaming when the
     client streams;
  3. every tensorrt_llm response is turned into text here (incremental detokenisation, text-level
     stop words, counts: ``textstream.GenerationState``, shared with postprocessing); the final
     flag of tensorrt_llm's stream is what ends ours, so finish_reason is always set on the last
     response.  A client that goes away cancels the tensorrt_llm request.
"""

import json
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

# textstream.py lives with the postprocessing model of the same repository.
_HERE = Path(__file__).resolve().parent
for _candidate in (_HERE, _HERE.parents[1] / "postprocessing" / "1"):
    if (_candidate / "textstream.py").is_file():
        sys.path.insert(0, str(_candidate))
        break
from textstream import GenerationState  # noqa: E402

_OPTIONAL_TO_LLM = {
    # contract input -> tensorrt_llm input
    "temperature": "temperature",
    "top_p": "runtime_top_p",
    "top_k": "runtime_top_k",
    "random_seed": "seed",
}


def _param(model_config, key, default=None):
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    if value is None or value == "" or value.startswith("${"):
        return default
    return value


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _contract_response(text, prompt_tokens, completion_tokens, finish_reason):
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([[prompt_tokens]], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([[completion_tokens]], dtype=np.int32)),
            pb_utils.Tensor("finish_reason", np.array([[finish_reason.encode("utf-8")]], dtype=np.object_)),
        ]
    )


def _error_response(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(model_config)
        self.llm_model = _param(model_config, "tensorrt_llm_model_name", "tensorrt_llm")
        self.preproc_model = _param(model_config, "preprocessing_model_name", "preprocessing")
        skip = _param(model_config, "skip_special_tokens", "true")
        self.skip_special_tokens = skip.lower() in ("1", "true", "t", "yes", "y")
        tokenizer_dir = _param(model_config, "tokenizer_dir")
        if not tokenizer_dir:
            raise pb_utils.TritonModelException("tensorrt_llm_bls: parameter tokenizer_dir is not set")
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir, legacy=False, padding_side="left", trust_remote_code=True
        )
        workers = int(_param(model_config, "max_concurrent_requests", "256"))
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="bls")
        self.logger = pb_utils.Logger

    # ------------------------------------------------------------------ one request

    def _preprocess(self, request, text_input, max_tokens):
        tensors = [pb_utils.Tensor("QUERY", text_input)]
        if max_tokens is not None:
            tensors.append(pb_utils.Tensor("REQUEST_OUTPUT_LEN", max_tokens.astype(np.int32)))
        for src, dst in (("stop_words", "STOP_WORDS_DICT"), ("end_id", "END_ID"), ("pad_id", "PAD_ID")):
            value = _input(request, src)
            if value is not None:
                tensors.append(pb_utils.Tensor(dst, value))
        response = pb_utils.InferenceRequest(
            model_name=self.preproc_model,
            inputs=tensors,
            requested_output_names=[
                "INPUT_ID",
                "REQUEST_INPUT_LEN",
                "REQUEST_OUTPUT_LEN",
                "STOP_WORDS_IDS",
                "BAD_WORDS_IDS",
                "OUT_END_ID",
                "OUT_PAD_ID",
            ],
        ).exec()
        if response.has_error():
            raise pb_utils.TritonModelException(response.error().message())
        return {t.name(): t.as_numpy() for t in response.output_tensors()}

    def _llm_inputs(self, request, pre, stream):
        tensors = [
            pb_utils.Tensor("input_ids", pre["INPUT_ID"]),
            pb_utils.Tensor("input_lengths", pre["REQUEST_INPUT_LEN"]),
            pb_utils.Tensor("request_output_len", pre["REQUEST_OUTPUT_LEN"]),
            pb_utils.Tensor("end_id", pre["OUT_END_ID"]),
            pb_utils.Tensor("pad_id", pre["OUT_PAD_ID"]),
            pb_utils.Tensor("streaming", np.array([[stream]], dtype=bool)),
            pb_utils.Tensor("exclude_input_in_output", np.array([[True]], dtype=bool)),
        ]
        if pre["STOP_WORDS_IDS"].shape[-1] > 0:
            tensors.append(pb_utils.Tensor("stop_words_list", pre["STOP_WORDS_IDS"]))
        for src, dst in _OPTIONAL_TO_LLM.items():
            value = _input(request, src)
            if value is not None:
                tensors.append(pb_utils.Tensor(dst, value))
        return tensors

    def _run(self, request, sender):
        """Serve one client request; returns the non-decoupled response (None when decoupled)."""
        text_input = _input(request, "text_input")
        if text_input is None or text_input.size != 1:
            raise ValueError("text_input must hold exactly one string")
        text_input = text_input.reshape(1, 1)
        max_tokens = _input(request, "max_tokens")
        if max_tokens is not None:
            max_tokens = max_tokens.reshape(1, 1)
        stream_in = _input(request, "stream")
        stream = bool(stream_in.reshape(-1)[0]) if stream_in is not None else False
        if stream and not self.decoupled:
            raise ValueError("stream=true needs the model to be deployed with decoupled_mode=true")

        pre = self._preprocess(request, text_input, max_tokens)
        prompt_tokens = int(pre["REQUEST_INPUT_LEN"].reshape(-1)[0])
        stop_words = _input(request, "stop_words")
        words = [w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in stop_words.reshape(-1)] if stop_words is not None else []
        state = GenerationState(
            self.tokenizer,
            max_tokens=int(pre["REQUEST_OUTPUT_LEN"].reshape(-1)[0]),
            end_id=int(pre["OUT_END_ID"].reshape(-1)[0]),
            stop_words=words,
            skip_special_tokens=self.skip_special_tokens,
        )

        llm_request = pb_utils.InferenceRequest(
            model_name=self.llm_model,
            inputs=self._llm_inputs(request, pre, stream),
            requested_output_names=["output_ids", "sequence_length"],
        )
        parts = []
        responses = llm_request.exec(decoupled=True)
        for r in responses:
            if r.has_error():
                raise pb_utils.TritonModelException(r.error().message())
            if sender is not None and sender.is_cancelled():
                cancel = getattr(responses, "cancel", None)
                if cancel is not None:
                    cancel()
                return None
            final = bool(r.flags() & pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL) if hasattr(r, "flags") else False
            out = {t.name(): t.as_numpy() for t in r.output_tensors()}
            ids = []
            if "output_ids" in out:
                n = int(out["sequence_length"].reshape(-1)[0])
                ids = out["output_ids"][0][0][:n]  # batch 0, beam 0
            text, completion, reason = state.feed(ids, final=final)
            if stream:
                if text or reason or len(ids):
                    sender.send(_contract_response(text, prompt_tokens, completion, reason))
            else:
                parts.append(text)
            if state.finished:
                if reason == "stop" and not final:
                    # text-level stop word hit before the engine noticed: stop generating
                    cancel = getattr(responses, "cancel", None)
                    if cancel is not None:
                        cancel()
                break
        if not state.finished:  # tensorrt_llm ended without a final flag we could read
            text, completion, reason = state.feed([], final=True)
            if stream:
                sender.send(_contract_response(text, prompt_tokens, completion, reason))
            else:
                parts.append(text)
        if stream:
            return None
        return _contract_response("".join(parts), prompt_tokens, state.completion_tokens, state.finish_reason)

    def _serve_decoupled(self, request):
        sender = request.get_response_sender()
        try:
            response = self._run(request, sender)
            if response is not None:
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:
            self.logger.log_error(traceback.format_exc())
            sender.send(_error_response(f"tensorrt_llm_bls: {exc}"), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    # ------------------------------------------------------------------ execute

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self.pool.submit(self._serve_decoupled, request)
            return None
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request, None))
            except Exception as exc:
                self.logger.log_error(traceback.format_exc())
                responses.append(_error_response(f"tensorrt_llm_bls: {exc}"))
        return responses

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=False)
