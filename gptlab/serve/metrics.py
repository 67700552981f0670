"""The server's metrics in Prometheus' text exposition format (version 0.0.4), written by hand:
counters, gauges and histograms with labels, nothing more.

Counters and histograms are updated on the event loop's thread; gauges are set by the scheduler
threads. A lock keeps a scrape from reading a histogram halfway through an update.
"""

from __future__ import annotations

import threading
from collections import defaultdict

# Seconds. Time to first token includes waiting for a slot; per-token latency is one decode step.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

Labels = tuple[tuple[str, str], ...]


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative; summed when written
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1


class Metrics:
    """Every family the server exports, by name; ``render()`` writes them all."""

    FAMILIES = {
        "gptlab_requests_total": ("counter", "HTTP requests answered, by path and status code"),
        "gptlab_prompt_tokens_total": ("counter", "prompt tokens of admitted sequences"),
        "gptlab_generation_tokens_total": ("counter", "tokens generated"),
        "gptlab_sequences_finished_total": ("counter", "sequences that ended, by finish reason (abort: cancelled)"),
        "gptlab_running_sequences": ("gauge", "sequences holding a slot of the running batch"),
        "gptlab_waiting_sequences": ("gauge", "sequences queued for a slot"),
        "gptlab_time_to_first_token_seconds": ("histogram", "from a request's arrival to a sequence's first token"),
        "gptlab_time_per_output_token_seconds": ("histogram", "between consecutive tokens of a sequence"),
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[Labels, Histogram]] = defaultdict(dict)

    def add(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            family = self._values[name]
            family[key] = family.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = TTFT_BUCKETS if name == "gptlab_time_to_first_token_seconds" else TOKEN_BUCKETS
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._histograms[name].setdefault(key, Histogram(buckets)).observe(value)

    def value(self, name: str, **labels: str) -> float:
        """One counter's or gauge's value (0 when never set): for tests and /health."""
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text) in self.FAMILIES.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    for labels, histogram in sorted(self._histograms[name].items()):
                        lines += _histogram_lines(name, labels, histogram)
                else:
                    for labels, value in sorted(self._values[name].items()):
                        lines.append(f"{name}{_label_text(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def _histogram_lines(name: str, labels: Labels, histogram: Histogram) -> list[str]:
    lines, cumulative = [], 0
    for bound, count in zip(histogram.buckets, histogram.counts):
        cumulative += count
        lines.append(f"{name}_bucket{_label_text(labels + (('le', _number(bound)),))} {cumulative}")
    lines.append(f"{name}_bucket{_label_text(labels + (('le', '+Inf'),))} {histogram.count}")
    lines.append(f"{name}_sum{_label_text(labels)} {_number(histogram.total)}")
    lines.append(f"{name}_count{_label_text(labels)} {histogram.count}")
    return lines


def _label_text(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, v in labels)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(labels, escaped)) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
