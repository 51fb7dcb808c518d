"""Every config.pbtxt under triton_models/ parses as Triton's ModelConfig; the TensorRT-LLM
repository (templated) fills cleanly and exposes exactly the CPU tiers' tensor contract."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from extproc.commands.trtllm_fill import FillError, PLACEHOLDER_RE, fill_templates, find_placeholders, main  # noqa: E402

from tests.conftest import IN_CI  # noqa: E402

if IN_CI:  # tritonclient comes with the [stack] extra that `make install` installs
    from tritonclient.grpc import model_config_pb2  # noqa: E402
else:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
ModelConfig = model_config_pb2.ModelConfig
DataType = model_config_pb2.DataType

MODELS = REPO / "triton_models"
TRTLLM = MODELS / "trtllm"
SAMPLE_VALUES = TRTLLM / "values.example.yaml"

# The gateway's LLM contract: (name, data_type, dims, optional).  Same as llm-small's config.
CONTRACT_INPUTS = [
    ("text_input", "TYPE_STRING", [1], False),
    ("max_tokens", "TYPE_INT32", [1], True),
    ("stream", "TYPE_BOOL", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("top_k", "TYPE_INT32", [1], True),
    ("random_seed", "TYPE_UINT64", [1], True),
    ("stop_words", "TYPE_STRING", [-1], True),
    ("end_id", "TYPE_INT32", [1], True),
    ("pad_id", "TYPE_INT32", [1], True),
]
CONTRACT_OUTPUTS = [
    ("text_output", "TYPE_STRING", [1]),
    ("prompt_tokens", "TYPE_INT32", [1]),
    ("completion_tokens", "TYPE_INT32", [1]),
    ("finish_reason", "TYPE_STRING", [1]),
]


def _sample_values() -> dict:
    return yaml.safe_load(SAMPLE_VALUES.read_text())


@pytest.fixture(scope="module")
def filled_trtllm(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("trtllm") / "repo"
    fill_templates(TRTLLM, dest, _sample_values())
    return dest


def _parse(text: str, where: str) -> ModelConfig:
    cfg = ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as exc:
        pytest.fail(f"{where}: not a valid Triton ModelConfig: {exc}")
    return cfg


def _all_configs() -> list[Path]:
    return sorted(p for p in MODELS.rglob("config.pbtxt") if "__pycache__" not in p.parts)


def _io(tensors, with_optional=True):
    out = []
    for t in tensors:
        row = (t.name, DataType.Name(t.data_type), list(t.dims))
        out.append(row + (bool(t.optional),) if with_optional else row)
    return out


# ------------------------------------------------------------------------------ all configs


def test_found_configs():
    names = {p.parent.name for p in _all_configs()}
    assert {"preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls"} <= names
    assert "embedder" in names


@pytest.mark.parametrize("path", _all_configs(), ids=lambda p: str(p.relative_to(MODELS)))
def test_every_config_parses(path: Path, filled_trtllm: Path):
    text = path.read_text()
    if PLACEHOLDER_RE.search(text):
        # templated: parse the filled copy
        rel = path.relative_to(TRTLLM)
        text = (filled_trtllm / rel).read_text()
        assert not PLACEHOLDER_RE.search(text)
    cfg = _parse(text, str(path))
    assert cfg.name == path.parent.name, f"{path}: name {cfg.name!r} != folder {path.parent.name!r}"
    assert cfg.backend or cfg.platform, f"{path}: no backend/platform"
    for group in (cfg.input, cfg.output):  # an input and an output may share a name
        names = [t.name for t in group]
        assert len(names) == len(set(names)), f"{path}: duplicate tensor names"
    # a version folder must exist for Triton to load the model
    assert (path.parent / "1").is_dir(), f"{path.parent}/1 missing"


def test_only_trtllm_is_templated():
    for path in _all_configs():
        if TRTLLM not in path.parents:
            assert not PLACEHOLDER_RE.search(path.read_text()), f"{path} has placeholders"


# ------------------------------------------------------------------------------ trtllm repository


def _filled(filled: Path, model: str) -> ModelConfig:
    return _parse((filled / model / "config.pbtxt").read_text(), model)


def test_ensemble_and_bls_expose_the_contract(filled_trtllm: Path):
    for model in ("ensemble", "tensorrt_llm_bls"):
        cfg = _filled(filled_trtllm, model)
        assert _io(cfg.input) == CONTRACT_INPUTS, model
        assert _io(cfg.output, with_optional=False) == CONTRACT_OUTPUTS, model
        assert cfg.max_batch_size == int(_sample_values()["triton_max_batch_size"])


def test_contract_matches_llm_small(filled_trtllm: Path):
    small = MODELS / "llm-small" / "config.pbtxt"
    if not small.is_file():
        pytest.skip("triton_models/llm-small/config.pbtxt does not exist yet")
    ref = _parse(small.read_text(), "llm-small")
    by_name = lambda rows: sorted(rows)  # noqa: E731 - order of declaration is not part of the contract
    for model in ("ensemble", "tensorrt_llm_bls"):
        cfg = _filled(filled_trtllm, model)
        assert by_name(_io(cfg.input)) == by_name(_io(ref.input)), model
        assert by_name(_io(cfg.output, False)) == by_name(_io(ref.output, False)), model
        assert (cfg.max_batch_size > 0) == (ref.max_batch_size > 0), "batching dimension differs"
    bls = _filled(filled_trtllm, "tensorrt_llm_bls")
    assert bls.model_transaction_policy.decoupled == ref.model_transaction_policy.decoupled


def test_tensorrt_llm_model(filled_trtllm: Path):
    cfg = _filled(filled_trtllm, "tensorrt_llm")
    v = _sample_values()
    assert cfg.backend == "tensorrtllm"
    params = {k: p.string_value for k, p in cfg.parameters.items()}
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == v["engine_dir"]
    assert float(params["kv_cache_free_gpu_mem_fraction"]) == pytest.approx(float(v["kv_cache_free_gpu_mem_fraction"]))
    assert params["exclude_input_in_output"] == "true"
    assert params["batch_scheduler_policy"] in ("guaranteed_no_evict", "max_utilization")
    assert cfg.model_transaction_policy.decoupled is True
    assert cfg.max_batch_size == int(v["triton_max_batch_size"])
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == int(v["max_queue_size"])
    names = {t.name for t in cfg.input}
    assert {"input_ids", "input_lengths", "request_output_len", "streaming", "stop_words_list", "seed"} <= names
    assert {t.name for t in cfg.output} >= {"output_ids", "sequence_length"}


def test_ensemble_wiring_is_consistent(filled_trtllm: Path):
    """Every step's mapped tensors exist in that step's model config, and every ensemble input
    and output is wired."""
    ens = _filled(filled_trtllm, "ensemble")
    produced = {t.name for t in ens.input}
    consumed: set[str] = set()
    for step in ens.ensemble_scheduling.step:
        model = _filled(filled_trtllm, step.model_name)
        model_in = {t.name: t for t in model.input}
        model_out = {t.name for t in model.output}
        for key, tensor in step.input_map.items():
            assert key in model_in, f"{step.model_name} has no input {key}"
            assert tensor in produced, f"{step.model_name}.{key} <- {tensor}: not produced before this step"
            consumed.add(tensor)
        required = {n for n, t in model_in.items() if not t.optional}
        assert required <= set(step.input_map), f"{step.model_name}: required inputs not mapped: {required - set(step.input_map)}"
        for key, tensor in step.output_map.items():
            assert key in model_out, f"{step.model_name} has no output {key}"
            produced.add(tensor)
    assert {t.name for t in ens.input} <= consumed, "ensemble input not used by any step"
    assert {t.name for t in ens.output} <= produced, "ensemble output not produced"


def test_python_models_are_valid_python():
    files = sorted(TRTLLM.rglob("*.py"))
    assert {f.parent.parent.name for f in files if f.name == "model.py"} == {
        "preprocessing",
        "postprocessing",
        "tensorrt_llm_bls",
    }
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        if f.name == "model.py":
            classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
            assert "TritonPythonModel" in classes, f
            src = f.read_text()
            assert "AutoTokenizer" in src, f"{f}: tokenizer should come from transformers"


# ------------------------------------------------------------------------------ fill errors


def test_fill_reports_missing_and_unknown(tmp_path: Path):
    values = _sample_values()
    del values["engine_dir"]
    values["engine_dri"] = "/typo"
    with pytest.raises(FillError) as ei:
        fill_templates(TRTLLM, tmp_path / "out", values)
    msg = str(ei.value)
    assert "${engine_dir}" in msg and "tensorrt_llm/config.pbtxt" in msg
    assert "engine_dri" in msg
    assert not (tmp_path / "out").exists(), "nothing may be written on error"


def test_fill_rejects_bad_values_and_destinations(tmp_path: Path):
    values = _sample_values()
    with pytest.raises(FillError, match="double quote"):
        fill_templates(TRTLLM, tmp_path / "a", {**values, "engine_dir": 'x"y'})
    with pytest.raises(FillError, match=r"\$\{"):
        fill_templates(TRTLLM, tmp_path / "b", {**values, "engine_dir": "${tokenizer_dir}"})
    with pytest.raises(FillError, match="outside"):
        fill_templates(TRTLLM, TRTLLM / "sub", values)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(FillError, match="not empty"):
        fill_templates(TRTLLM, busy, values)
    written = fill_templates(TRTLLM, busy, values, overwrite=True)
    assert not (busy / "x").exists() and len(written) == 5


def test_fill_output_tree(tmp_path: Path):
    values = {**_sample_values(), "decoupled_mode": False, "kv_cache_free_gpu_mem_fraction": 0.5}
    written = fill_templates(TRTLLM, tmp_path / "repo", values)
    assert [p.relative_to(tmp_path / "repo").as_posix() for p in written] == [
        "ensemble/config.pbtxt",
        "postprocessing/config.pbtxt",
        "preprocessing/config.pbtxt",
        "tensorrt_llm/config.pbtxt",
        "tensorrt_llm_bls/config.pbtxt",
    ]
    repo = tmp_path / "repo"
    assert (repo / "postprocessing/1/textstream.py").is_file() and (repo / "tensorrt_llm/1").is_dir()
    cfg = _parse((repo / "tensorrt_llm/config.pbtxt").read_text(), "tensorrt_llm")
    assert cfg.model_transaction_policy.decoupled is False
    assert cfg.parameters["kv_cache_free_gpu_mem_fraction"].string_value == "0.5"


def test_find_placeholders_lists_deployment_knobs():
    names = set(find_placeholders(TRTLLM))
    assert {
        "engine_dir",
        "tokenizer_dir",
        "triton_max_batch_size",
        "max_queue_delay_microseconds",
        "kv_cache_free_gpu_mem_fraction",
        "decoupled_mode",
        "preprocessing_instance_count",
        "bls_instance_count",
    } <= names
    assert names == set(_sample_values()), "values.example.yaml must cover exactly the placeholders"


def test_main_cli(tmp_path: Path, capsys):
    vals = tmp_path / "v.yaml"
    vals.write_text(SAMPLE_VALUES.read_text())
    rc = main([str(TRTLLM), str(tmp_path / "out"), "--values", str(vals), "engine_dir=/engines/other"])
    assert rc == 0
    assert "tensorrt_llm/config.pbtxt" in capsys.readouterr().out
    assert '"/engines/other"' in (tmp_path / "out/tensorrt_llm/config.pbtxt").read_text()

    rc = main([str(TRTLLM), str(tmp_path / "out2"), "engine_dir=/x", "bogus=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "bogus" in err and "${tokenizer_dir}" in err

    rc = main([str(TRTLLM), str(tmp_path / "out3"), "novalue"])
    assert rc == 2 and "key=value" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    assert main([str(TRTLLM), str(tmp_path / "out4"), "--values", str(bad)]) == 2
    assert "mapping" in capsys.readouterr().err

    assert main(["--list", str(TRTLLM)]) == 0
    assert "engine_dir" in capsys.readouterr().out


# ------------------------------------------------------------------------------ textstream


def _load_textstream():
    path = TRTLLM / "postprocessing" / "1" / "textstream.py"
    spec = importlib.util.spec_from_file_location("trtllm_textstream", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class ByteTokenizer:
    """Token id = one UTF-8 byte (+3); 0 pad, 1 bos, 2 eos. Decodes like an HF byte-level BPE."""

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens=True):
        data = bytes(i - 3 for i in ids if i >= 3)
        return data.decode("utf-8", errors="replace")


def test_textstream_streaming_deltas_and_counts():
    ts = _load_textstream()
    tok = ByteTokenizer()
    ids = tok.encode("héllo wörld")
    st = ts.GenerationState(tok, max_tokens=100, end_id=2)
    out = ""
    for i in ids:
        text, n, reason = st.feed([i])
        assert "\ufffd" not in text  # never half a character
        out += text
        assert reason == ""
    text, n, reason = st.feed([2])  # end token
    assert out + text == "héllo wörld"
    assert n == len(ids) and reason == "stop"


def test_textstream_length_and_stop_words():
    ts = _load_textstream()
    tok = ByteTokenizer()
    st = ts.GenerationState(tok, max_tokens=5, end_id=2)
    text, n, reason = st.feed(tok.encode("abcdefgh"), final=True)
    assert (text, n, reason) == ("abcde", 5, "length")

    st = ts.GenerationState(tok, max_tokens=50, end_id=2, stop_words=["END", "\n\n"])
    streamed = []
    for i in tok.encode("hello EN"):
        streamed.append(st.feed([i])[0])
    assert "".join(streamed) == "hello "  # "EN" held back: could start "END"
    text, n, reason = st.feed(tok.encode("D more"))
    assert text == "" and reason == "stop" and n == len("hello END")
    # after finishing, more tokens change nothing
    assert st.feed(tok.encode("zzz")) == ("", n, "stop")

    st = ts.GenerationState(tok, max_tokens=50, end_id=2, stop_words=["END"])
    assert st.feed(tok.encode("fine EN"), final=True) == ("fine EN", 7, "stop")


def test_textstream_non_streaming_whole_output():
    ts = _load_textstream()
    tok = ByteTokenizer()
    st = ts.GenerationState(tok, max_tokens=16, end_id=2)
    assert st.feed(tok.encode("short") + [2, 0, 0], final=True) == ("short", 5, "stop")
    st = ts.GenerationState(tok, max_tokens=5, end_id=2)
    assert st.feed(tok.encode("exact"), final=True) == ("exact", 5, "length")


# ------------------------------------------------------------------------------ python models, run
# The preprocessing / postprocessing / BLS model.py files need Triton's Python backend
# (triton_python_backend_utils) and transformers, neither of which is here.  They run below
# against small stand-ins: a fake pb_utils with the calls these models make, a byte-level
# tokenizer as AutoTokenizer, and a scripted tensorrt_llm that "generates" a fixed text.

import json as _json  # noqa: E402
import threading as _threading  # noqa: E402
import types as _types  # noqa: E402

import numpy as np  # noqa: E402
from google.protobuf import json_format  # noqa: E402

EOS, PAD = 2, 0


class _FakeTokenizer:
    eos_token = "</s>"
    pad_token = None

    def encode(self, text, add_special_tokens=True):
        if text == self.eos_token:
            return [EOS]
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([1] + ids) if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _TritonError:
    def __init__(self, msg):
        self._msg = msg

    def message(self):
        return self._msg


class _Response:
    def __init__(self, output_tensors=(), error=None, flags=0):
        self._tensors, self._error, self._flags = list(output_tensors), error, flags

    def output_tensors(self):
        return self._tensors

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error

    def flags(self):
        return self._flags

    def as_dict(self):
        return {t.name(): t.as_numpy() for t in self._tensors}


class _Sender:
    def __init__(self):
        self.sent, self.done = [], _threading.Event()

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))
        if flags & 1:
            self.done.set()

    def is_cancelled(self):
        return False


class _Request:
    def __init__(self, inputs, request_id=""):
        self.inputs, self._id, self.sender = dict(inputs), request_id, _Sender()

    def request_id(self):
        return self._id

    def get_response_sender(self):
        return self.sender


REPLY = "Hi there, wörld!"  # what the scripted tensorrt_llm generates, then EOS


def _fake_trtllm(inputs, decoupled):
    """Scripted generation honouring request_output_len, streaming and end token."""
    n = int(np.asarray(inputs["request_output_len"]).reshape(-1)[0])
    stream = bool(np.asarray(inputs.get("streaming", [[False]])).reshape(-1)[0])
    toks = _FakeTokenizer().encode(REPLY, add_special_tokens=False)[:n]
    # like TRT-LLM: the end token is not part of the output, the stream just ends
    chunks = [[t] for t in toks] if stream else [toks]

    def resp(ids, final):
        arr = np.array([[ids]], dtype=np.int32).reshape(1, 1, -1)
        return _Response(
            [_Tensor("output_ids", arr), _Tensor("sequence_length", np.array([[len(ids)]], np.int32))],
            flags=1 if final else 0,
        )

    return [resp(c, i == len(chunks) - 1) for i, c in enumerate(chunks)]


def _make_pb_utils(models):
    pb = _types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor
    pb.InferenceResponse = _Response
    pb.TritonError = _TritonError
    pb.TritonModelException = type("TritonModelException", (Exception,), {})
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.Logger = _types.SimpleNamespace(log_info=lambda m: None, log_warn=lambda m: None, log_error=lambda m: None)

    def get_input_tensor_by_name(request, name):
        v = request.inputs.get(name)
        return None if v is None else _Tensor(name, v)

    def get_output_config_by_name(config, name):
        return next(o for o in config["output"] if o["name"] == name)

    pb.get_input_tensor_by_name = get_input_tensor_by_name
    pb.get_output_config_by_name = get_output_config_by_name
    pb.triton_string_to_numpy = lambda t: {"TYPE_INT32": np.int32, "TYPE_STRING": np.object_, "TYPE_BOOL": bool}[t]
    pb.using_decoupled_model_transaction_policy = lambda c: bool(c.get("model_transaction_policy", {}).get("decoupled"))

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names=(), request_id=""):
            self.model_name, self.inputs = model_name, {t.name(): t.as_numpy() for t in inputs}

        def exec(self, decoupled=False):
            if self.model_name == "tensorrt_llm":
                return iter(_fake_trtllm(self.inputs, decoupled))
            (resp,) = models[self.model_name].execute([_Request(self.inputs)])
            return resp

    pb.InferenceRequest = InferenceRequest
    return pb


def _model_json(filled: Path, name: str) -> str:
    cfg = _parse((filled / name / "config.pbtxt").read_text(), name)
    return _json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True))


@pytest.fixture
def trtllm_models(filled_trtllm, monkeypatch):
    models = {}
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _make_pb_utils(models))
    fake_tf = _types.ModuleType("transformers")
    fake_tf.AutoTokenizer = _types.SimpleNamespace(from_pretrained=lambda *a, **k: _FakeTokenizer())
    monkeypatch.setitem(sys.modules, "transformers", fake_tf)
    monkeypatch.delitem(sys.modules, "textstream", raising=False)
    for name in ("preprocessing", "postprocessing", "tensorrt_llm_bls"):
        path = filled_trtllm / name / "1" / "model.py"
        spec = importlib.util.spec_from_file_location(f"trtllm_{name}_model", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        m = mod.TritonPythonModel()
        m.initialize({"model_config": _model_json(filled_trtllm, name), "model_repository": str(path.parent.parent)})
        models[name] = m
    yield models
    models["tensorrt_llm_bls"].finalize()


def _contract_inputs(text, max_tokens=None, stream=None, stop_words=None):
    inputs = {"text_input": np.array([[text.encode()]], dtype=np.object_)}
    if max_tokens is not None:
        inputs["max_tokens"] = np.array([[max_tokens]], dtype=np.int32)
    if stream is not None:
        inputs["stream"] = np.array([[stream]], dtype=bool)
    if stop_words is not None:
        inputs["stop_words"] = np.array([[w.encode() for w in stop_words]], dtype=np.object_)
    return inputs


def _run_ensemble(models, text, max_tokens=None, stream=False, stop_words=None, request_id="req-1"):
    """What the ensemble scheduler does, step by step (the request id is propagated)."""
    (pre,) = models["preprocessing"].execute(
        [
            _Request(
                {
                    "QUERY": np.array([[text.encode()]], dtype=np.object_),
                    **({"REQUEST_OUTPUT_LEN": np.array([[max_tokens]], np.int32)} if max_tokens else {}),
                    **({"STOP_WORDS_DICT": np.array([[w.encode() for w in stop_words]], np.object_)} if stop_words else {}),
                }
            )
        ]
    )
    assert not pre.has_error(), pre.error() and pre.error().message()
    p = pre.as_dict()
    outs = []
    for r in _fake_trtllm({"request_output_len": p["REQUEST_OUTPUT_LEN"], "streaming": [[stream]]}, True):
        g = r.as_dict()
        post_in = {
            "TOKENS_BATCH": g["output_ids"],
            "SEQUENCE_LENGTH": g["sequence_length"],
            "INPUT_LENGTH": p["REQUEST_INPUT_LEN"],
            "MAX_TOKENS": p["REQUEST_OUTPUT_LEN"],
            "END_ID": p["OUT_END_ID"],
            "STREAM": np.array([[stream]], dtype=bool),
        }
        if stop_words:
            post_in["STOP_WORDS"] = np.array([[w.encode() for w in stop_words]], np.object_)
        (out,) = models["postprocessing"].execute([_Request(post_in, request_id)])
        assert not out.has_error(), out.error().message()
        d = out.as_dict()
        outs.append(
            (
                d["OUTPUT"][0][0].decode(),
                int(d["PROMPT_TOKENS"][0][0]),
                int(d["COMPLETION_TOKENS"][0][0]),
                d["FINISH_REASON"][0][0].decode(),
            )
        )
    return p, outs


def test_preprocessing_outputs(trtllm_models):
    p, _ = _run_ensemble(trtllm_models, "abc", stop_words=["END", "xy"])
    assert p["INPUT_ID"].tolist() == [[1, ord("a") + 3, ord("b") + 3, ord("c") + 3]]
    assert p["REQUEST_INPUT_LEN"].tolist() == [[4]]
    assert p["REQUEST_OUTPUT_LEN"].tolist() == [[int(_sample_values()["default_max_tokens"])]]
    ids = [ord(c) + 3 for c in "ENDxy"]
    assert p["STOP_WORDS_IDS"].tolist() == [[ids, [3, 5, -1, -1, -1]]]
    assert p["OUT_END_ID"].tolist() == [[EOS]] and p["OUT_PAD_ID"].tolist() == [[EOS]]


def test_ensemble_path_non_streaming(trtllm_models):
    _, outs = _run_ensemble(trtllm_models, "hello", max_tokens=64)
    n = len(REPLY.encode())
    assert outs == [(REPLY, 6, n, "stop")]
    _, outs = _run_ensemble(trtllm_models, "hello", max_tokens=5)
    assert outs == [(REPLY[:5], 6, 5, "length")]
    _, outs = _run_ensemble(trtllm_models, "hello", max_tokens=64, stop_words=[","])
    assert outs[-1][0] == "Hi there" and outs[-1][3] == "stop"


def test_ensemble_path_streaming_uses_request_id_state(trtllm_models):
    _, outs = _run_ensemble(trtllm_models, "hello", max_tokens=7, stream=True, request_id="abc")
    assert "".join(o[0] for o in outs) == REPLY[:7]
    assert [o[2] for o in outs] == list(range(1, 8))  # cumulative
    assert [o[3] for o in outs] == [""] * 6 + ["length"]
    assert trtllm_models["postprocessing"]._streams == {}  # state dropped at the end


def test_bls_streaming_and_not(trtllm_models):
    bls = trtllm_models["tensorrt_llm_bls"]
    req = _Request(_contract_inputs("hello", max_tokens=64, stream=True))
    assert bls.execute([req]) is None
    assert req.sender.done.wait(10)
    parts = [r.as_dict() for r, _ in req.sender.sent if r is not None]
    text = "".join(d["text_output"][0][0].decode() for d in parts)
    assert text == REPLY
    assert [int(d["completion_tokens"][0][0]) for d in parts] == list(range(1, len(REPLY.encode()) + 1))
    assert [d["finish_reason"][0][0].decode() for d in parts][-1] == "stop"
    assert all(d["finish_reason"][0][0] == b"" for d in parts[:-1])
    assert all(int(d["prompt_tokens"][0][0]) == 6 for d in parts)

    req = _Request(_contract_inputs("hello", max_tokens=4))
    bls.execute([req])
    assert req.sender.done.wait(10)
    (final, flags), = req.sender.sent
    d = final.as_dict()
    assert flags == 1
    assert (d["text_output"][0][0].decode(), int(d["completion_tokens"][0][0]), d["finish_reason"][0][0]) == (
        "Hi t",
        4,
        b"length",
    )


def test_bls_stop_word_and_bad_input(trtllm_models):
    bls = trtllm_models["tensorrt_llm_bls"]
    req = _Request(_contract_inputs("hello", max_tokens=64, stop_words=["there"]))
    bls.execute([req])
    assert req.sender.done.wait(10)
    d = req.sender.sent[0][0].as_dict()
    assert d["text_output"][0][0] == b"Hi " and d["finish_reason"][0][0] == b"stop"

    req = _Request(_contract_inputs("hello", max_tokens=0))
    bls.execute([req])
    assert req.sender.done.wait(10)
    resp, flags = req.sender.sent[0]
    assert resp.has_error() and "max_tokens" in resp.error().message() and flags == 1
