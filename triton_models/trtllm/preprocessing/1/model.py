"""preprocessing: text -> token ids for the tensorrt_llm model (TensorRT-LLM backend layout).

Inputs (batched, dims after the batch dimension):
  QUERY STRING [1]; REQUEST_OUTPUT_LEN INT32 [1] (optional: parameter default_max_tokens);
  STOP_WORDS_DICT / BAD_WORDS_DICT STRING [-1] (optional); END_ID / PAD_ID INT32 [1] (optional).
Outputs:
  INPUT_ID INT32 [-1] (right-padded with pad id), REQUEST_INPUT_LEN INT32 [1] (= prompt_tokens),
  REQUEST_OUTPUT_LEN INT32 [1], STOP_WORDS_IDS / BAD_WORDS_IDS INT32 [2, -1] (TRT-LLM word-list
  format: flat ids, then cumulative end offsets padded with -1), OUT_END_ID / OUT_PAD_ID INT32 [1].
"""

import json
from typing import List, Optional

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


def _param(model_config: dict, key: str, default: Optional[str] = None) -> Optional[str]:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    if value is None or value == "" or value.startswith("${"):
        return default
    return value


def _truthy(value: Optional[str], default: bool) -> bool:
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "t", "yes", "y")


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        tokenizer_dir = _param(model_config, "tokenizer_dir")
        if not tokenizer_dir:
            raise pb_utils.TritonModelException("preprocessing: parameter tokenizer_dir is not set")
        self.add_special_tokens = _truthy(_param(model_config, "add_special_tokens"), True)
        self.default_max_tokens = int(_param(model_config, "default_max_tokens", "256"))

        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir, legacy=False, padding_side="left", trust_remote_code=True
        )
        if not self.tokenizer.pad_token:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.end_id = self.tokenizer.encode(self.tokenizer.eos_token, add_special_tokens=False)[0]
        self.pad_id = self.tokenizer.encode(self.tokenizer.pad_token, add_special_tokens=False)[0]

        self.out_dtypes = {}
        for name in (
            "INPUT_ID",
            "REQUEST_INPUT_LEN",
            "REQUEST_OUTPUT_LEN",
            "STOP_WORDS_IDS",
            "BAD_WORDS_IDS",
            "OUT_END_ID",
            "OUT_PAD_ID",
        ):
            cfg = pb_utils.get_output_config_by_name(model_config, name)
            self.out_dtypes[name] = pb_utils.triton_string_to_numpy(cfg["data_type"])

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _optional(request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _encode(self, query: np.ndarray):
        ids = [
            np.asarray(
                self.tokenizer.encode(row[0].decode("utf-8"), add_special_tokens=self.add_special_tokens),
                dtype=np.int32,
            )
            for row in query
        ]
        lengths = np.array([[len(x)] for x in ids], dtype=np.int32)
        if int(lengths.min()) == 0:
            raise ValueError("text_input tokenizes to zero tokens")
        width = int(lengths.max())
        padded = np.full((len(ids), width), self.pad_id, dtype=np.int32)
        for i, x in enumerate(ids):
            padded[i, : len(x)] = x
        return padded, lengths

    def _word_list(self, words: Optional[np.ndarray], batch_size: int) -> np.ndarray:
        """TRT-LLM word list format [batch, 2, n]: row 0 flat ids, row 1 end offsets (-1 padded)."""
        if words is None:
            return np.empty((batch_size, 2, 0), dtype=np.int32)
        flat_ids: List[np.ndarray] = []
        offsets: List[np.ndarray] = []
        for row in words:
            item_ids: List[int] = []
            item_offsets: List[int] = []
            for word in row:
                if isinstance(word, bytes):
                    word = word.decode("utf-8")
                if not word:
                    continue
                ids = self.tokenizer.encode(word, add_special_tokens=False)
                if not ids:
                    continue
                item_ids += ids
                item_offsets.append(len(item_ids))
            flat_ids.append(np.array(item_ids, dtype=np.int32))
            offsets.append(np.array(item_offsets, dtype=np.int32))
        width = max(1, max(len(x) for x in flat_ids))
        out = np.zeros((len(flat_ids), 2, width), dtype=np.int32)
        out[:, 1, :] = -1
        for i, (ids, offs) in enumerate(zip(flat_ids, offsets)):
            out[i, 0, : len(ids)] = ids
            out[i, 1, : len(offs)] = offs
        return out

    # ------------------------------------------------------------------ execute

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                query = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy()
                batch_size = query.shape[0]
                output_len = self._optional(request, "REQUEST_OUTPUT_LEN")
                if output_len is None:
                    output_len = np.full((batch_size, 1), self.default_max_tokens, dtype=np.int32)
                output_len = output_len.astype(np.int32).reshape(batch_size, 1)
                if int(output_len.min()) <= 0:
                    raise ValueError("max_tokens must be > 0")
                end_id = self._optional(request, "END_ID")
                if end_id is None:
                    end_id = np.full((batch_size, 1), self.end_id, dtype=np.int32)
                pad_id = self._optional(request, "PAD_ID")
                if pad_id is None:
                    pad_id = np.full((batch_size, 1), self.pad_id, dtype=np.int32)

                input_id, input_len = self._encode(query)
                stop_words = self._word_list(self._optional(request, "STOP_WORDS_DICT"), batch_size)
                bad_words = self._word_list(self._optional(request, "BAD_WORDS_DICT"), batch_size)

                d = self.out_dtypes
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor("INPUT_ID", input_id.astype(d["INPUT_ID"])),
                            pb_utils.Tensor("REQUEST_INPUT_LEN", input_len.astype(d["REQUEST_INPUT_LEN"])),
                            pb_utils.Tensor("REQUEST_OUTPUT_LEN", output_len.astype(d["REQUEST_OUTPUT_LEN"])),
                            pb_utils.Tensor("STOP_WORDS_IDS", stop_words.astype(d["STOP_WORDS_IDS"])),
                            pb_utils.Tensor("BAD_WORDS_IDS", bad_words.astype(d["BAD_WORDS_IDS"])),
                            pb_utils.Tensor("OUT_END_ID", np.asarray(end_id).reshape(batch_size, 1).astype(d["OUT_END_ID"])),
                            pb_utils.Tensor("OUT_PAD_ID", np.asarray(pad_id).reshape(batch_size, 1).astype(d["OUT_PAD_ID"])),
                        ]
                    )
                )
            except Exception as exc:  # one bad request must not fail the batch
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"preprocessing: {exc}"))
                )
        return responses

    def finalize(self):
        self.tokenizer = None
