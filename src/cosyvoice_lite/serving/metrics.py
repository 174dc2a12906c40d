"""Prometheus text-format metrics, kept by hand (no client library needed).

Exposed at ``/metrics``: request counts by endpoint and status, errors by code, queue depth,
requests in flight, real-time factor and first-audio latency histograms, audio produced, and how
much the engine loop batched (decode steps and flow chunks computed together).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

PREFIX = "cosyvoice"
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [
            f'{name}_bucket{{le="{bound:g}"}} {count}'
            for bound, count in zip(self.buckets, self.counts, strict=True)
        ]
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.total}',
            f"{name}_sum {self.sum:.6f}",
            f"{name}_count {self.total}",
        ]
        return out


def sample(value: float) -> str:
    """A sample's value in full: ``:g`` kept 6 digits, so a counter past a million moved in
    steps of 10 or more and its rate() read 0 or jumped."""
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 2**63 else repr(value)


class Metrics:
    """Thread-safe counters and histograms; gauges are read from callbacks at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.counters: dict[str, float] = defaultdict(float)
        self.rtf = Histogram(RTF_BUCKETS)
        self.first_audio = Histogram(LATENCY_BUCKETS)
        # values read at each scrape: name -> (help, read, Prometheus type: gauge or counter)
        self.readings: dict[str, tuple[str, Callable[[], float], str]] = {}
        self.info: dict[str, str] = {}

    def request(self, method: str, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(method, endpoint, status)] += 1

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def count(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self.counters[name] += value

    def synthesis(self, audio_seconds: float, compute_seconds: float) -> None:
        with self._lock:
            self.counters["audio_seconds_total"] += audio_seconds
            self.counters["synthesis_seconds_total"] += compute_seconds
            if audio_seconds > 0:
                self.rtf.observe(compute_seconds / audio_seconds)

    def first_audio_latency(self, seconds: float) -> None:
        with self._lock:
            self.first_audio.observe(seconds)

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.readings[name] = (help, read, "gauge")

    def counter(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere (e.g. by the engine loop), read at each scrape."""
        self.readings[name] = (help, read, "counter")

    def render(self) -> str:
        p = PREFIX
        lines: list[str] = []
        with self._lock:
            lines += [
                f"# HELP {p}_requests_total HTTP requests by endpoint and status.",
                f"# TYPE {p}_requests_total counter",
            ]
            for (method, endpoint, status), n in sorted(self.requests.items()):
                labels = _labels({"method": method, "endpoint": endpoint, "status": str(status)})
                lines.append(f"{p}_requests_total{labels} {n}")
            lines += [
                f"# HELP {p}_errors_total Error responses by error code.",
                f"# TYPE {p}_errors_total counter",
            ]
            for code, n in sorted(self.errors.items()):
                lines.append(f"{p}_errors_total{_labels({'code': code})} {n}")
            for name, help in (
                ("audio_seconds_total", "Seconds of audio synthesized."),
                ("synthesis_seconds_total", "Seconds spent synthesizing."),
                ("rejected_total", "Requests refused with 429 because the queue was full."),
                ("cancelled_total", "Syntheses stopped because the client went away."),
                ("timeouts_total", "Syntheses stopped by the per-request timeout."),
                ("voices_created_total", "Voices added to the library."),
                ("outputs_saved_total", "Results saved to the outputs directory."),
                ("outputs_removed_total", "Results removed after --outputs-keep-days."),
                ("s3_uploads_total", "Results uploaded to S3."),
                ("s3_upload_errors_total", "Failed S3 uploads."),
                ("truncated_streams_total", "Streamed responses aborted before their end."),
            ):
                lines += [
                    f"# HELP {p}_{name} {help}",
                    f"# TYPE {p}_{name} counter",
                    f"{p}_{name} {sample(self.counters.get(name, 0.0))}",
                ]
            lines += [
                f"# HELP {p}_real_time_factor Synthesis time / audio duration per request.",
                f"# TYPE {p}_real_time_factor histogram",
            ]
            lines += self.rtf.lines(f"{p}_real_time_factor")
            lines += [
                f"# HELP {p}_first_audio_seconds Seconds from request to first audio chunk.",
                f"# TYPE {p}_first_audio_seconds histogram",
            ]
            lines += self.first_audio.lines(f"{p}_first_audio_seconds")
        for name, (help, read, kind) in sorted(self.readings.items()):
            try:
                value = sample(read())
            except Exception:  # noqa: BLE001 - one unreadable gauge must not hide the others
                value = "NaN"
            lines += [
                f"# HELP {p}_{name} {help}",
                f"# TYPE {p}_{name} {kind}",
                f"{p}_{name} {value}",
            ]
        if self.info:
            lines += [
                f"# HELP {p}_model_info The loaded model.",
                f"# TYPE {p}_model_info gauge",
                f"{p}_model_info{_labels(self.info)} 1",
            ]
        return "\n".join(lines) + "\n"
