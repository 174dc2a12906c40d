"""Tiny stand-ins for the official ONNX models of a CosyVoice model directory, for tests.

They have the official input/output names, dtypes and ranks, so they exercise exactly the code
path of the real files:

* ``campplus.onnx``: input ``input`` float32 ``(B, T, 80)`` -> output ``output`` float32
  ``(B, 192)`` (mean absolute feature per bin, then a fixed affine map and tanh).
* ``speech_tokenizer_v{1,2,3}.onnx``: inputs ``feats`` float32 ``(1, 128, T)`` and
  ``feats_length`` int32 ``(1,)`` -> output ``indices`` int32 ``(1, 1, N)``. The first
  ``feats_length`` frames (100 frames/s) are average-pooled to 50 Hz (v1) or 25 Hz (v2/v3),
  ``N = ceil(T / 2)`` or ``ceil(T / 4)``, centred over the mel bins, and each pooled frame x
  becomes a token
  ``argmax(x @ A) * size + argmax(x @ B)`` with fixed random ``A, B``: 64 x 64 = 4096 codes (v1)
  or 81 x 81 = 6561 codes (v2/v3). Deterministic, and different audio gives different tokens.

Names: ``input``/``output`` for CAM++ are used by the official runtime
(runtime/triton_trtllm: ``set_input_shape('input', ...)``) and by third-party C++ ports;
``feats``/``feats_length``/``indices`` for the S3 tokenizer come from third-party ONNX Runtime
ports; the official Python reads names from the session, which the wrappers do too.

Usage: ``python tools/make_onnx_standins.py MODEL_DIR --version 2``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # loadable by onnxruntime >= 1.14 (the official pin is 1.18)

# version -> (pooling stride in 100 Hz mel frames, factor of the codebook size)
TOKENIZER_SHAPES = {1: (2, 64), 2: (4, 81), 3: (4, 81)}
EMBEDDING_DIM = 192
FBANK_BINS = 80
WHISPER_MELS = 128


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name=name)


def _finish(graph: onnx.GraphProto, producer: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def make_campplus(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((FBANK_BINS, EMBEDDING_DIM)) / np.sqrt(FBANK_BINS)).astype(
        np.float32
    )
    bias = (0.1 * rng.standard_normal(EMBEDDING_DIM)).astype(np.float32)
    nodes = [
        # The real input is mean-normalised over time, so pool |x| rather than x.
        helper.make_node("Abs", ["input"], ["magnitude"]),
        helper.make_node("ReduceMean", ["magnitude"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["pooled", "weight", "bias"], ["affine"]),
        helper.make_node("Tanh", ["affine"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "campplus_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T", FBANK_BINS])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", EMBEDDING_DIM])],
        initializer=[_const("weight", weight), _const("bias", bias)],
    )
    return _finish(graph, "cosyvoice-lite campplus stand-in")


def make_speech_tokenizer(version: int, seed: int = 0) -> onnx.ModelProto:
    stride, size = TOKENIZER_SHAPES[version]
    rng = np.random.default_rng(seed + version)
    proj_a = rng.standard_normal((WHISPER_MELS, size)).astype(np.float32)
    proj_b = rng.standard_normal((WHISPER_MELS, size)).astype(np.float32)
    nodes = [
        # Only the first feats_length frames are valid (the official batch export pads).
        helper.make_node("Slice", ["feats", "zero", "feats_length", "time_axis"], ["valid"]),
        helper.make_node(
            "AveragePool",
            ["valid"],
            ["pooled"],
            kernel_shape=[stride],
            strides=[stride],
            ceil_mode=1,
            count_include_pad=0,
        ),
        # Remove each frame's mean over the mel bins so that tokens follow the spectral shape.
        helper.make_node("ReduceMean", ["pooled"], ["level"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["pooled", "level"], ["shape"]),
        helper.make_node("Transpose", ["shape"], ["frames"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["frames", "proj_a"], ["logits_a"]),
        helper.make_node("MatMul", ["frames", "proj_b"], ["logits_b"]),
        helper.make_node("ArgMax", ["logits_a"], ["code_a"], axis=2, keepdims=0),
        helper.make_node("ArgMax", ["logits_b"], ["code_b"], axis=2, keepdims=0),
        helper.make_node("Mul", ["code_a", "size"], ["high"]),
        helper.make_node("Add", ["high", "code_b"], ["code"]),
        helper.make_node("Cast", ["code"], ["code32"], to=TensorProto.INT32),
        helper.make_node("Unsqueeze", ["code32", "one"], ["indices"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"speech_tokenizer_v{version}_standin",
        [
            helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, WHISPER_MELS, "T"]),
            helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1]),
        ],
        [helper.make_tensor_value_info("indices", TensorProto.INT32, [1, 1, "N"])],
        initializer=[
            _const("zero", np.array([0], dtype=np.int32)),
            _const("time_axis", np.array([2], dtype=np.int32)),
            _const("proj_a", proj_a),
            _const("proj_b", proj_b),
            _const("size", np.array(size, dtype=np.int64)),
            _const("one", np.array([1], dtype=np.int64)),
        ],
    )
    return _finish(graph, f"cosyvoice-lite speech_tokenizer_v{version} stand-in")


def _version_number(version: int | str) -> int:
    number = int(str(version).lower().lstrip("v"))
    if number not in TOKENIZER_SHAPES:
        raise ValueError(f"unknown CosyVoice version {version!r}; expected 1, 2 or 3")
    return number


def write_standins(model_dir: str | Path, version: int | str) -> dict[str, Path]:
    """Write ``campplus.onnx`` and ``speech_tokenizer_v{version}.onnx`` into ``model_dir``.

    Returns ``{"campplus": path, "speech_tokenizer": path}``.
    """
    number = _version_number(version)
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "campplus": model_dir / "campplus.onnx",
        "speech_tokenizer": model_dir / f"speech_tokenizer_v{number}.onnx",
    }
    onnx.save(make_campplus(), paths["campplus"])
    onnx.save(make_speech_tokenizer(number), paths["speech_tokenizer"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--version", default="2", help="CosyVoice version: 1, 2 or 3")
    args = parser.parse_args()
    for name, path in write_standins(args.model_dir, args.version).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
