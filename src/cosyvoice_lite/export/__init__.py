"""Portable graphs: ONNX export of every network (`export_onnx`) and an onnxruntime backend for
the flow estimator and the vocoder (`use_onnxruntime`). Needs `onnx` at export time only
(the ``export`` extra: ``pip install -e '.[export]'`` in a checkout); docs/EXPORT.md describes the graphs for other runtimes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .onnx_export import ExportError, export_onnx
    from .runtime import use_onnxruntime

__all__ = ["ExportError", "export_onnx", "use_onnxruntime"]


def __getattr__(name: str) -> Any:  # import torch-heavy modules only when used
    if name in ("export_onnx", "ExportError"):
        from . import onnx_export

        return getattr(onnx_export, name)
    if name == "use_onnxruntime":
        from .runtime import use_onnxruntime

        return use_onnxruntime
    raise AttributeError(name)
