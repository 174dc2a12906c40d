"""Where the tests find the official's outputs: ``tests/data/golden/<name>``, or the copy of it
made on this kind of CPU.

The goldens were made on an AVX-512 CPU (tools/golden/README.md; an AMD EPYC Zen 5 gives the
same floats). torch's float32 products, convolutions and FFTs (MKL's, which takes other code
paths on an Intel CPU) round differently on another kind of CPU, the official's as much as ours,
and the vocoder's source phase accumulates that over an utterance: the tokens and the mels still
match within 1e-4, but the official's own waveforms move by up to ~6e-2 (CosyVoice2). So the
goldens that came out different were made again on each such kind by the same scripts
(``GOLDEN_ROOT=tests/data/golden/<kind>``): an AVX2-only AMD EPYC (``avx2``) and an Intel Xeon
with AVX-512 and AMX (``avx512-intel``). The tests take the copy of the CPU they run on, keeping
1e-4 on every CPU (on the AMD ones our outputs equal the official's bit for bit).
"""

from __future__ import annotations

from pathlib import Path

from cosyvoice_lite.device import cpu_features

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


def cpu_vendor() -> str:
    """``intel``, ``amd`` or '' (not read on this system)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            line = next((line for line in info if line.startswith("vendor_id")), "")
    except OSError:
        return ""
    vendor = line.partition(":")[2].strip()
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, "")


def golden_kinds() -> list[str]:
    """This CPU's golden folders, most specific first: ``<capability>-<vendor>``, then
    ``<capability>`` (torch's capability: ``avx2``, ``avx512``)."""
    capability, vendor = cpu_features().capability.lower(), cpu_vendor()
    return [f"{capability}-{vendor}", capability] if vendor else [capability]


def golden_file(relative: str) -> Path:
    """``tests/data/golden/<kind>/<relative>`` where this kind of CPU has its own copy of that
    file (e.g. ``avx2``, ``avx512-intel``), else ``tests/data/golden/<relative>``."""
    for kind in golden_kinds():
        specific = GOLDEN / kind / relative
        if specific.is_file():
            return specific
    return GOLDEN / relative
