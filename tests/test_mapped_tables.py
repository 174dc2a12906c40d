"""The LLMs' text tables read from the checkpoint file's pages on a CPU (mapped_tables.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cosyvoice_lite import Engine
from cosyvoice_lite.mapped_tables import MappedEmbedding, map_checkpoint_tensor, map_tables
from cosyvoice_lite.modeldir import load_checkpoint

MODELS = Path(__file__).resolve().parent / "data" / "models"
TABLES = {"v1-tiny": "text_embedding", "v2-tiny": "llm.model.model.embed_tokens"}


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds ``tensor``'s first byte (Linux), or None."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.parametrize("model", sorted(TABLES))
def test_the_text_table_is_the_checkpoint_files_pages(model: str) -> None:
    engine = Engine.load(MODELS / model)
    try:
        lm = engine.pipeline.llm
        table = lm.get_submodule(TABLES[model])
        assert isinstance(table, MappedEmbedding)
        assert _mapped_file(table.weight) == str((MODELS / model / "llm.pt").resolve())
        state = load_checkpoint(MODELS / model / "llm.pt")
        assert torch.equal(table.weight, state[f"{TABLES[model]}.weight"])
        if model == "v2-tiny":  # Qwen2's lm_head is tied to the table and follows it
            assert lm.llm.model.lm_head.weight is table.weight
    finally:
        engine.close()


def test_a_cast_model_casts_the_rows_it_reads() -> None:
    """bfloat16 weights: the table keeps the file's float32 and the rows read are cast, the
    floats of a cast table."""
    engine = Engine.load(MODELS / "v2-tiny", dtype="bfloat16")
    try:
        table = engine.pipeline.llm.get_submodule(TABLES["v2-tiny"])
        assert table.weight.dtype == torch.float32
        ids = torch.tensor([[0, 17, 151935]])
        rows = table(ids)
        assert rows.dtype == torch.bfloat16
        assert torch.equal(rows, table.weight.to(torch.bfloat16)[ids])
    finally:
        engine.close()


def test_a_table_the_file_does_not_hold_stays_loaded(tmp_path: Path) -> None:
    class Network(nn.Module):
        mapped_tables = {"table": "for the test"}

        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(8, 4)

    path = tmp_path / "other.pt"
    torch.save({"something.else": torch.zeros(8, 4)}, path)
    network = Network()
    assert map_checkpoint_tensor(path, "table.weight") is None
    assert map_tables(network, path) == 0
    assert type(network.table) is nn.Embedding
