"""Where the tests find the official's outputs: ``tests/data/golden/<name>``, or the copy of it
made on this kind of CPU.

The goldens were made on an AVX-512 CPU (tools/golden/README.md). On an AVX2-only CPU (an AMD
EPYC Zen 3 here) torch's float32 products, convolutions and FFTs round differently, the official's
as much as ours, and the vocoder's source phase accumulates that over an utterance: the tokens
and the mels still match within 1e-4, but the official's own waveforms move by up to ~6e-2
(CosyVoice2) from the AVX-512 ones. So the goldens of waveforms were made again on such a CPU by
the same scripts (``GOLDEN_ROOT=tests/data/golden/avx2``; only the files that came out different
are kept there) and the tests take the copy of the CPU they run on, keeping 1e-4 on every CPU.
On that AMD EPYC our outputs equal the official's bit for bit, as on the AVX-512 CPU.
"""

from __future__ import annotations

from pathlib import Path

from cosyvoice_lite.device import cpu_features

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


def golden_file(relative: str) -> Path:
    """``tests/data/golden/<capability>/<relative>`` where this kind of CPU has its own copy of
    that file (e.g. ``avx2``), else ``tests/data/golden/<relative>``."""
    specific = GOLDEN / cpu_features().capability.lower() / relative
    return specific if specific.is_file() else GOLDEN / relative
