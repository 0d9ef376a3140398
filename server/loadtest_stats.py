"""Statistics of a load test, as pure functions over per-request records (so they test on fixed data).

Definitions follow vLLM's `bench serve`: TTFT is send -> first content chunk; TPOT is
(latency - TTFT) / (output tokens - 1) for requests with more than one output token; ITL is every gap
between consecutive content chunks; E2EL is send -> end of stream; goodput counts the successful
requests that meet every given SLO, per second of benchmark duration.
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import asdict, dataclass, field

import numpy as np

GOODPUT_KEYS = ("ttft", "tpot", "e2el")
PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request did. Times in seconds; `sent_at` and `finished_at` relative to the benchmark start."""

    index: int
    prompt_tokens: int
    max_tokens: int
    sent: bool = False
    success: bool = False
    error: str = ""
    output_tokens: int = 0
    output_tokens_source: str = ""  # "usage" (server's count) or "chunks" (one token per content chunk)
    sent_at: float = 0.0
    finished_at: float = 0.0
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    generated_text: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens <= 1 or self.ttft is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        out = asdict(self)
        out["tpot"] = self.tpot
        return out


@dataclass
class BenchmarkRun:
    """Every prompt's record (sent or not), the timed duration, and whether Ctrl-C ended the run early."""

    records: list[RequestRecord]
    duration_s: float
    interrupted: bool = False


def parse_goodput_item(text: str) -> tuple[str, float]:
    """argparse type for one `--goodput` item, `KEY:MILLISECONDS`."""
    key, sep, value = text.partition(":")
    key = key.strip().lower()
    if not sep or key not in GOODPUT_KEYS:
        raise argparse.ArgumentTypeError(
            f"invalid goodput SLO {text!r}: use KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}"
        )
    try:
        ms = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid goodput SLO {text!r}: {value!r} is not a number") from None
    if not ms > 0:
        raise argparse.ArgumentTypeError(f"invalid goodput SLO {text!r}: the limit must be > 0 ms")
    return key, ms


def distribution_ms(values_s: list[float]) -> dict[str, float]:
    """Mean, median, p90, p99 (linear interpolation, as numpy) of seconds, in milliseconds; zeros if empty."""
    if not values_s:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0, "count": 0}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {"mean": float(ms.mean()), "median": float(np.median(ms))}
    for p in PERCENTILES[1:]:
        out[f"p{p}"] = float(np.percentile(ms, p))
    out["count"] = len(values_s)
    return out


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """A successful request is good when each given metric is within its limit (TPOT 0 for 1 token)."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.latency}
    for key, limit in slos_ms.items():
        value = values[key]
        if value is None or value * 1000.0 > limit:
            return False
    return True


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    slos_ms: dict[str, float] | None = None,
    max_concurrency: int | None = None,
) -> dict:
    """The summary of a run: counts, throughputs over `duration_s`, and latency distributions."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    duration = max(duration_s, 1e-9)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    errors = collections.Counter(r.error.split("\n")[0][:200] for r in failed)
    summary = {
        "successful_requests": len(ok),
        "failed_requests": len(failed),
        "max_concurrency": max_concurrency,
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "goodput_slos_ms": dict(slos_ms or {}),
        "request_goodput": None,
        "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": distribution_ms([gap for r in ok for gap in r.itl]),
        "e2el_ms": distribution_ms([r.latency for r in ok]),
        "errors": dict(errors.most_common()),
    }
    if slos_ms:
        summary["request_goodput"] = sum(meets_slos(r, slos_ms) for r in ok) / duration
    return summary


_LABELS = {
    "ttft_ms": ("Time to First Token", "TTFT"),
    "tpot_ms": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl_ms": ("Inter-token Latency", "ITL"),
    "e2el_ms": ("End-to-end Latency", "E2EL"),
}


def format_summary(summary: dict, width: int = 50) -> str:
    """vLLM-style result table."""
    lines = [" Serving Benchmark Result ".center(width, "=")]

    def row(label: str, value) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40}{text:>{width - 40}}")

    row("Successful requests:", summary["successful_requests"])
    row("Failed requests:", summary["failed_requests"])
    if summary.get("max_concurrency"):
        row("Maximum request concurrency:", summary["max_concurrency"])
    row("Benchmark duration (s):", float(summary["duration_s"]))
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", float(summary["request_throughput"]))
    row("Output token throughput (tok/s):", float(summary["output_throughput"]))
    row("Total token throughput (tok/s):", float(summary["total_token_throughput"]))
    if summary.get("request_goodput") is not None:
        row("Request goodput (req/s):", float(summary["request_goodput"]))
    for key, (title, short) in _LABELS.items():
        dist = summary[key]
        lines.append(f" {title} ".center(width, "-"))
        row(f"Mean {short} (ms):", float(dist["mean"]))
        row(f"Median {short} (ms):", float(dist["median"]))
        row(f"P90 {short} (ms):", float(dist["p90"]))
        row(f"P99 {short} (ms):", float(dist["p99"]))
    if summary.get("errors"):
        lines.append(" Errors ".center(width, "-"))
        for message, count in list(summary["errors"].items())[:5]:
            lines.append(f"{count:>6} x {message[: width + 20]}")
    lines.append("=" * width)
    return "\n".join(lines)
