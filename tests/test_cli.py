"""The command line: normalize prints segments with no weights loaded; say reports progress."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cosyvoice_lite.cli import main


def test_normalize_prints_segments_without_weights(capsys) -> None:
    assert main(["normalize", "价格是12.5元，2024年3月1日出发。然后我们再见。"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out and "十二点五" in out[0] and "二零二四年" in "".join(out)


def test_normalize_reads_stdin() -> None:
    done = subprocess.run([sys.executable, "-m", "cosyvoice_lite.cli", "normalize", "-"],
                          input="I have 3 apples.", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "three" in done.stdout


def test_say_shows_progress_for_long_text(v1_variants: dict[str, Path], tmp_path: Path, capsys) -> None:
    text = "第一句话在这里。" * 12 + "最后一句。"
    out = tmp_path / "long.wav"
    assert main(["say", text, "--model", str(v1_variants["sft"]), "--voice", "中文女",
                 "--seed", "3", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "segments" in err and out.stat().st_size > 44


def test_errors_exit_with_status_2(tmp_path: Path, capsys) -> None:
    assert main(["voices", "--model", str(tmp_path)]) == 2
    assert "not a CosyVoice model directory" in capsys.readouterr().err
