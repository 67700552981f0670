"""Helpers shared by the benchmarks: fair timing of two contenders and the final JSON line.

Timings interleave the contenders (ours, peer, ours, peer, ...) so that drift in a shared
machine's load hits both alike, and report medians, which one slow repeat does not move.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronize(device: str) -> None:
    """Wait for queued device work, so a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    contenders: dict[str, Callable[[], object]], repeats: int, device: str
) -> tuple[dict[str, float], dict[str, object]]:
    """Median wall seconds per call of each contender, and each one's output.

    Each contender is first called once untimed (warm-up); that call's output is returned, so
    checking that the contenders agree costs no extra run.
    """
    outputs = {name: fn() for name, fn in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def result_line(benchmark: str, ours: float, peer: float, unit: str, device: str) -> str:
    """The one JSON line per measurement that tools read from a benchmark's output."""
    return json.dumps(
        {
            "benchmark": benchmark,
            "ours": round(ours, 2),
            "peer": round(peer, 2),
            "ratio": round(ours / peer, 3),
            "unit": unit,
            "device": device_name(device),
        }
    )
