"""Embedding tables read straight from the checkpoint file (CPU).

The LLMs' text vocabularies are large and read a few rows at a time: CosyVoice2/3's Qwen2 table
has 151,936 rows (545 MB in float32), of which a request reads the rows of its text; v1's has
51,866 (106 MB). Loaded like the other weights, every row is resident for the process's life. A
network module class names such tables

    mapped_tables = {"child.embedding": "why its rows are read sparsely", ...}

and on a CPU the loader replaces each by a ``MappedEmbedding`` over the checkpoint file's own
bytes (a private, copy-on-write mapping nobody writes): only the pages of rows read become
resident, and they are the page cache's, shared by every process that serves the same model.
The table keeps the checkpoint's dtype; rows are cast after the lookup, which gives the floats of
a cast table. A checkpoint file must then not be rewritten in place while it is served (replace
it by renaming a new file over it, as downloads do).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

MAPPED_ATTRIBUTE = "mapped_tables"


class MappedEmbedding(nn.Embedding):
    """``nn.Embedding`` over a table mapped from its checkpoint file; looked-up rows are cast to
    ``dtype`` (the network's compute dtype)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, padding_idx: int | None) -> None:
        rows, width = weight.shape
        super().__init__(rows, width, padding_idx=padding_idx, _weight=weight, _freeze=True)
        self.out_dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.out_dtype)


def map_checkpoint_tensor(path: Path, name: str) -> torch.Tensor | None:
    """The tensor ``name`` of the checkpoint ``path`` (a ``torch.save`` zip) over the file's
    bytes, or None where it cannot be mapped (not in the file, not contiguous)."""
    try:
        meta = torch.load(path, map_location="meta", weights_only=True)[name]
        offset = meta.untyped_storage()._checkpoint_offset
    except Exception:  # noqa: BLE001 - an unusual file: the table stays loaded
        log.debug("cannot locate %s in %s", name, path, exc_info=True)
        return None
    if offset is None or not meta.is_contiguous():
        return None
    start = offset + meta.storage_offset() * meta.element_size()
    nbytes = meta.numel() * meta.element_size()
    if start + nbytes > path.stat().st_size:
        return None
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=start, shape=(nbytes,))
    return torch.from_numpy(raw).view(meta.dtype).view(meta.shape)


def map_tables(network: nn.Module, path: Path) -> int:
    """Replace the tables ``network``'s modules declare (``mapped_tables``) by ``MappedEmbedding``s
    over ``path``, the checkpoint the network was loaded from (after its precision was applied;
    CPU only). A mapped table must hold the loaded values (checked on a few rows) and the weights
    tied to it follow it. Returns the bytes no longer held in memory."""
    released = 0
    for prefix, module in list(network.named_modules()):
        for child_name in getattr(type(module), MAPPED_ATTRIBUTE, {}):
            full = f"{prefix}.{child_name}" if prefix else child_name
            parent_name, _, attribute = full.rpartition(".")
            parent = network.get_submodule(parent_name) if parent_name else network
            table = getattr(parent, attribute)
            if type(table) is not nn.Embedding or table.weight.device.type != "cpu":
                continue
            mapped = map_checkpoint_tensor(path, f"{full}.weight")
            if mapped is None or not _same_rows(mapped, table.weight):
                log.warning("%s: %s stays loaded (it cannot be mapped from the file)", path, full)
                continue
            old = table.weight
            replacement = MappedEmbedding(mapped, old.dtype, table.padding_idx)
            setattr(parent, attribute, replacement)
            for other in network.modules():  # e.g. Qwen2's lm_head, tied to the table
                if getattr(other, "weight", None) is old:
                    other.weight = replacement.weight
            released += old.numel() * old.element_size()
    return released


def _same_rows(mapped: torch.Tensor, loaded: torch.Tensor) -> bool:
    """The mapped table holds the loaded values (a few rows: reading all would make every page
    resident); the loaded ones may have been cast to the compute dtype since."""
    if mapped.shape != loaded.shape:
        return False
    rows = torch.tensor(sorted({0, mapped.shape[0] // 2, mapped.shape[0] - 1}))
    return torch.equal(mapped[rows].to(loaded.dtype), loaded[rows])
