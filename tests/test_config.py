"""The yaml is read as data: tags are recorded, never imported or executed."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosyvoice_lite.config import Component, Tagged, parse_model_config, read_hyperpyyaml
from cosyvoice_lite.errors import ModelDirError

DANGEROUS = """
__set_seed1: !apply:os.system ["touch {marker}"]
sample_rate: 22050
chunk: 25
ratio: 2
product: !ref <chunk> * <ratio>
sigma: 1e-06
thing: !new:os.remove
    path: {marker}
alias: !ref <thing>
"""


def test_tags_are_data_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    yaml_file = tmp_path / "cosyvoice.yaml"
    yaml_file.write_text(DANGEROUS.format(marker=marker))
    data = read_hyperpyyaml(yaml_file)
    assert not marker.exists()  # !apply was not executed
    assert "__set_seed1" not in data
    assert data["product"] == 50
    assert data["sigma"] == pytest.approx(1e-6)
    assert isinstance(data["thing"], Tagged) and data["thing"].target == "os.remove"
    assert data["alias"] == data["thing"]


def test_ref_expressions_other_than_arithmetic_are_refused(tmp_path: Path) -> None:
    yaml_file = tmp_path / "cosyvoice.yaml"
    yaml_file.write_text("a: 'x'\nb: !ref <a>.__class__\n")
    with pytest.raises(ModelDirError, match="unsupported !ref expression"):
        read_hyperpyyaml(yaml_file)


def test_garbage_yaml_is_a_clear_error(tmp_path: Path) -> None:
    yaml_file = tmp_path / "cosyvoice.yaml"
    yaml_file.write_text("llm: [unclosed\n")
    with pytest.raises(ModelDirError, match="cannot parse"):
        read_hyperpyyaml(yaml_file)


def test_official_format_yaml_parses_into_typed_config(v1_dir: Path) -> None:
    config = parse_model_config(read_hyperpyyaml(v1_dir / "cosyvoice.yaml"), 1)
    assert config.sample_rate == 22050
    assert config.llm.class_name == "TransformerLM"
    assert isinstance(config.llm.child("text_encoder"), Component)
    assert config.mel.n_fft == 1024 and config.mel.fmax == 8000
    assert config.sampling.top_k == 25 and config.sampling.top_p == pytest.approx(0.8)
    assert config.tokenizer.kind == "whisper"
    cfm = config.flow.child("decoder").kwargs["cfm_params"]
    assert cfm["inference_cfg_rate"] == pytest.approx(0.7)


def test_yaml_of_another_version_is_refused(v1_dir: Path) -> None:
    data = read_hyperpyyaml(v1_dir / "cosyvoice.yaml")
    with pytest.raises(ModelDirError, match="needs"):
        parse_model_config(data, 2)


def test_hostile_yaml_is_refused_at_once(tmp_path: Path) -> None:
    """Powers (9**9**9 never ends), nested aliases (a 450-byte file needing tens of GB) and
    expressions that fail (1/0, '1 2') are each a ModelDirError, found at once; keys that are
    not text are skipped (they raised AttributeError)."""
    import time

    laughs = "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)
    )
    # without aliases: each line refers twice to the one before (its work doubled per line:
    # 16 s at 21 lines), its numbers squared past any model's (a raw ValueError at 4300 digits),
    # or a chain of references past Python's recursion limit (a raw RecursionError)
    doubling = "a0: 1\n" + "".join(f"a{i}: !ref <a{i - 1}> + <a{i - 1}>\n" for i in range(1, 22))
    squaring = "a0: 99999\n" + "".join(
        f"a{i}: !ref <a{i - 1}> * <a{i - 1}>\n" for i in range(1, 14)
    )
    deep = "".join(f"a{i}: !ref <a{i + 1}>\n" for i in range(2000)) + "a2000: 1\n"
    cases = {
        "x: !ref 9**9**9**9\n": "unsupported !ref",
        "x: !ref 1/0\n": "unsupported !ref",
        "x: !ref 1 2\n": "unsupported !ref",
        laughs: "aliases",
        "llm: !ref <x>\n" + squaring + "x: !ref <a13>\n": "unsupported !ref",
        "llm: !ref <a0>\n" + deep: "nested more than 64 deep",
    }
    yaml_file = tmp_path / "cosyvoice.yaml"
    yaml_file.write_text(doubling)
    start = time.monotonic()
    assert read_hyperpyyaml(yaml_file)["a21"] == 2**21
    assert time.monotonic() - start < 2
    for text, message in cases.items():
        yaml_file.write_text("sample_rate: 22050\n" + text)
        start = time.monotonic()
        with pytest.raises(ModelDirError, match=message):
            read_hyperpyyaml(yaml_file)
        assert time.monotonic() - start < 2
    yaml_file.write_text("sample_rate: 22050\n1: one\nx: !ref (<sample_rate> + 2) * -1 / 2\n")
    assert read_hyperpyyaml(yaml_file)["x"] == -11026.0


def test_a_yaml_nested_past_pythons_recursion_limit_is_a_clear_error(tmp_path: Path) -> None:
    """[[[[...]]]] 20,000 deep was a raw RecursionError."""
    yaml_file = tmp_path / "cosyvoice.yaml"
    yaml_file.write_text("sample_rate: 22050\nextra: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ModelDirError, match="cannot parse .*nested too deeply"):
        read_hyperpyyaml(yaml_file)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("sample_rate: 22050", "sample_rate: abc", "sample_rate must be a positive whole"),
        ("sample_rate: 22050", "sample_rate: 0", "sample_rate must be a positive whole"),
        ("sample_rate: 22050", "sample_rate: [1]", "sample_rate must be a positive whole"),
        ("    input_frame_rate: 50", "    input_frame_rate: 0", "input_frame_rate must be"),
        ("        top_k: 25", "        top_k: 'x'", "top_k must be a whole number"),
        ("        top_k: 25", "        top_k: 2.5", "top_k must be a whole number"),
        ("        win_size: 10", "        win_size: 0", "win_size must be a whole number"),
        ("        top_p: 0.8", "        top_p: -3", "top_p must be a number above 0"),
        ("        top_p: 0.8", "        top_p: 0", "top_p must be a number above 0"),
        ("        top_p: 0.8", "        top_p: 1.5", "top_p must be a number above 0"),
        ("        tau_r: 0.1", "        tau_r: -0.1", "tau_r must be a number from 0 to 1"),
        ("        tau_r: 0.1", "        tau_r: .nan", "tau_r must be a number from 0 to 1"),
    ],
)
def test_yaml_values_a_model_cannot_run_with_are_refused(
    v1_dir: Path, tmp_path: Path, old: str, new: str, message: str
) -> None:
    """They loaded, then failed every request with a raw exception (a sampling value), gave
    NaN audio or divided by zero (a rate of 0), or were a raw ValueError/TypeError at load."""
    text = (v1_dir / "cosyvoice.yaml").read_text()
    assert old in text
    yaml_file = tmp_path / "cosyvoice.yaml"
    yaml_file.write_text(text.replace(old, new, 1))
    with pytest.raises(ModelDirError, match=message):
        parse_model_config(read_hyperpyyaml(yaml_file), 1, source=str(yaml_file))
    yaml_file.write_text(text.replace("        top_p: 0.8", "        top_p: 1", 1))  # the edge
    assert parse_model_config(read_hyperpyyaml(yaml_file), 1).sampling.top_p == 1
