"""The ONNX graph of all-MiniLM-L6-v2, built from its safetensors weights (no PyTorch).

:func:`build_model` writes, node by node with the ``onnx`` helper API, exactly what
:class:`extproc.embeddings.encoder.MiniLMEncoder` computes: BERT embeddings (word + token type +
position) and LayerNorm, the self-attention / erf-GELU layers, mean pooling over the attention
mask and L2 normalisation. Its ops are laid out as Hugging Face's PyTorch export lays out BERT, the
pattern ONNX Runtime's transformer optimizer recognises, so :func:`fuse` turns it into
``EmbedLayerNormalization``, ``Attention``, ``SkipLayerNormalization`` and ``BiasGelu`` nodes
(:func:`fused_op_counts` tells which happened). :func:`quantize_int8` is the dynamic int8 variant.

Inputs ``input_ids``, ``token_type_ids`` (zeros), ``attention_mask``: int64 [batch, seq], right
padded. Output ``sentence_embedding``: float32 [batch, hidden], unit norm.
"""

from __future__ import annotations

import collections
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["BUILDER_VERSION", "OPSET", "EXPECTED_FUSIONS", "build_model", "fuse", "fused_op_counts", "quantize_int8"]

#: Bump when the graph written here changes (it is part of the cached model's key).
BUILDER_VERSION = 1
#: LayerNormalization is an ONNX op from opset 17.
OPSET = 17
#: Padded keys get this added to their attention scores (Hugging Face's BERT value; exp() of it
#: is 0.0 in float32, as with MiniLMEncoder's dtype minimum).
MASK_FILTER = -10000.0
#: The fused ops a 6-layer BERT should end with, and how many of each.
EXPECTED_FUSIONS = {"EmbedLayerNormalization": 1, "Attention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6}

_F32 = np.float32


class _GraphWriter:
    """Collects nodes and initializers under unique names."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = collections.Counter()

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        from onnx import helper

        self._count[op_type] += 1
        name = name or f"{op_type}_{self._count[op_type]}"
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name


def _linear(g: _GraphWriter, x: str, w: np.ndarray, b: np.ndarray, name: str) -> str:
    """``x @ w.T + b`` for torch Linear's ``[out, in]`` weight (MatMul then Add, as exported)."""
    mm = g.op("MatMul", [x, g.const(f"{name}.weight_t", np.ascontiguousarray(w.T, dtype=_F32))], f"{name}/MatMul")
    return g.op("Add", [mm, g.const(f"{name}.bias", b.astype(_F32))], f"{name}/Add")


def build_model(weights: Mapping[str, np.ndarray], config: Mapping, max_positions: int | None = None):
    """The fp32 ``onnx.ModelProto`` of the sentence encoder (see the module docstring).

    :param weights: the checkpoint's tensors (``safetensors.numpy.load_file``), names with or
        without the ``bert.`` prefix.
    :param config: the checkpoint's ``config.json``.
    """
    from onnx import TensorProto, helper

    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""

    def w(name: str) -> np.ndarray:
        return np.ascontiguousarray(weights[prefix + name], dtype=_F32)

    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = hidden // heads
    eps = float(config.get("layer_norm_eps", 1e-12))
    n_layers = int(config["num_hidden_layers"])
    positions = int(max_positions or config.get("max_position_embeddings", 512))

    g = _GraphWriter()
    ids, types, mask = "input_ids", "token_type_ids", "attention_mask"
    i64 = np.int64

    # embeddings: (word + token type) + position, then LayerNorm
    word = g.op("Gather", [g.const("embeddings.word_embeddings.weight", w("embeddings.word_embeddings.weight")), ids])
    seg = g.op("Gather", [g.const("embeddings.token_type_embeddings.weight", w("embeddings.token_type_embeddings.weight")), types])
    shape = g.op("Shape", [ids])
    seq_len = g.op("Gather", [shape, g.const("const.one_scalar", np.array(1, i64))], axis=0)
    seq_end = g.op("Unsqueeze", [seq_len, g.const("const.axes0", np.array([0], i64))])
    pos_ids = g.op("Slice", [g.const("embeddings.position_ids", np.arange(positions, dtype=i64)[None, :]),
                             g.const("const.zero", np.array([0], i64)), seq_end,
                             g.const("const.axes1", np.array([1], i64)), g.const("const.step1", np.array([1], i64))])
    pos = g.op("Gather", [g.const("embeddings.position_embeddings.weight",
                                  w("embeddings.position_embeddings.weight")[:positions]), pos_ids])
    emb = g.op("Add", [g.op("Add", [word, seg]), pos])
    x = g.op("LayerNormalization", [emb, g.const("embeddings.LayerNorm.weight", w("embeddings.LayerNorm.weight")),
                                    g.const("embeddings.LayerNorm.bias", w("embeddings.LayerNorm.bias"))],
             "embeddings/LayerNorm", axis=-1, epsilon=eps)

    # additive attention bias: (1 - mask) * MASK_FILTER, [batch, 1, 1, seq]
    m = g.op("Unsqueeze", [g.op("Unsqueeze", [mask, g.const("const.axes_1", np.array([1], i64))]),
                           g.const("const.axes_2", np.array([2], i64))])
    m = g.op("Cast", [m], to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.const("const.f_one", np.array(1.0, _F32)), m]),
                        g.const("const.mask_filter", np.array(MASK_FILTER, _F32))])

    split_heads = g.const("const.split_heads", np.array([0, 0, heads, head_dim], i64))
    merge_heads = g.const("const.merge_heads", np.array([0, 0, hidden], i64))
    scale = g.const("const.sqrt_head_dim", np.array(math.sqrt(head_dim), _F32))
    sqrt2 = g.const("const.sqrt2", np.array(math.sqrt(2.0), _F32))
    half = g.const("const.half", np.array(0.5, _F32))
    f_one = "const.f_one"

    for i in range(n_layers):
        p = f"encoder.layer.{i}."

        def proj(part: str, perm: list[int]) -> str:
            y = _linear(g, x, w(p + f"attention.self.{part}.weight"), w(p + f"attention.self.{part}.bias"),
                        f"{p}attention.self.{part}")
            return g.op("Transpose", [g.op("Reshape", [y, split_heads])], perm=perm)

        q = proj("query", [0, 2, 1, 3])
        k = proj("key", [0, 2, 3, 1])
        v = proj("value", [0, 2, 1, 3])
        scores = g.op("Add", [g.op("Div", [g.op("MatMul", [q, k]), scale]), bias])
        probs = g.op("Softmax", [scores], axis=-1)
        ctx = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge_heads])
        attn = _linear(g, ctx, w(p + "attention.output.dense.weight"), w(p + "attention.output.dense.bias"),
                       f"{p}attention.output.dense")
        x = g.op("LayerNormalization", [g.op("Add", [attn, x]),
                                        g.const(p + "attention.output.LayerNorm.weight", w(p + "attention.output.LayerNorm.weight")),
                                        g.const(p + "attention.output.LayerNorm.bias", w(p + "attention.output.LayerNorm.bias"))],
                 f"{p}attention.output.LayerNorm", axis=-1, epsilon=eps)
        h = _linear(g, x, w(p + "intermediate.dense.weight"), w(p + "intermediate.dense.bias"), f"{p}intermediate.dense")
        # exact GELU: x * 0.5 * (1 + erf(x / sqrt 2)), the pattern of torch's export
        h = g.op("Mul", [g.op("Mul", [h, g.op("Add", [g.op("Erf", [g.op("Div", [h, sqrt2])]), f_one])]), half])
        out = _linear(g, h, w(p + "output.dense.weight"), w(p + "output.dense.bias"), f"{p}output.dense")
        x = g.op("LayerNormalization", [g.op("Add", [out, x]),
                                        g.const(p + "output.LayerNorm.weight", w(p + "output.LayerNorm.weight")),
                                        g.const(p + "output.LayerNorm.bias", w(p + "output.LayerNorm.bias"))],
                 f"{p}output.LayerNorm", axis=-1, epsilon=eps)

    # sentence-transformers: mean pooling over the mask (count clamped at 1e-9), then F.normalize (eps 1e-12)
    mf = g.op("Unsqueeze", [g.op("Cast", [mask], to=TensorProto.FLOAT), g.const("const.axes_last", np.array([-1], i64))])
    summed = g.op("ReduceSum", [g.op("Mul", [x, mf]), "const.axes1"], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [mf, "const.axes1"], keepdims=0), g.const("const.count_min", np.array(1e-9, _F32))])
    pooled = g.op("Div", [summed, count])
    norm = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [pooled, pooled]), "const.axes1"], keepdims=1)])
    norm = g.op("Max", [norm, g.const("const.norm_min", np.array(1e-12, _F32))])
    g.op("Div", [pooled, norm], "sentence_embedding")

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in (ids, types, mask)]
    output = helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])
    graph = helper.make_graph(g.nodes, "all-MiniLM-L6-v2", inputs, [output], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="llm-extproc")
    model.ir_version = 8  # readable by every ONNX Runtime that knows opset 17
    return model


def fuse(model, num_heads: int, hidden_size: int):
    """The model after ONNX Runtime's BERT fusions (Python ones only: the result stays portable
    across CPUs; the session applies its own hardware-specific ones when it loads)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_shape_inference = False  # symbolic shape inference needs sympy; the fusions here do not
    optimized = optimize_model(model, model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               optimization_options=options, opt_level=0)
    model = optimized.model
    if not any(o.domain == "com.microsoft" for o in model.opset_import):  # the fused ops' domain
        from onnx import helper

        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def fused_op_counts(model) -> dict[str, int]:
    """How many of each node the graph has (``EXPECTED_FUSIONS`` names the ones fusion makes)."""
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def quantize_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Dynamic int8 quantization of ``src``'s MatMul/Attention weights (activations quantized per
    call), written to ``dst``."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ONNX's shape inference does not know the fused (com.microsoft) ops: their outputs are float
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return Path(dst)
