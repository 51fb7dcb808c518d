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

from extproc.trtllm_fill import FillError, PLACEHOLDER_RE, fill_templates, find_placeholders, main  # noqa: E402

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
