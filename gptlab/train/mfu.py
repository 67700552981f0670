"""The peak throughput that the training loop's ``mfu`` (model FLOPs utilisation) divides by.

On a GPU the peak is the data sheet's dense bf16 figure. On a CPU it is measured: the best of
several short fp32 matmul timings. A CPU that other processes share reads low, and a peak measured
low makes every later MFU too high (130% was shown on a busy machine). So the best figure a machine
has shown is kept per CPU model and thread count in ``$XDG_CACHE_HOME/gptlab/cpu_peak_flops.json``
(``~/.cache`` when unset), and a run divides by the higher of that figure and its own measurement:
one run on an idle machine fixes the figure for every later run. A cache that cannot be read or
written costs only that: the run uses its own measurement. The loop still clamps MFU to 100%.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from gptlab.fileio import write_json_atomic

# Dense bf16 tensor-core peaks (FLOP/s) for MFU, from NVIDIA's data sheets; other GPUs report no
# MFU. Matched against the device name in this order, so the PCIe and NVL boards (lower clocks)
# are found before the SXM default of their family.
GPU_PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "4090": 165e12,
}

CACHE_FILE = "cpu_peak_flops.json"


def peak_flops(device: torch.device) -> float | None:
    """The device's peak matmul throughput: a table for GPUs, a measurement and a cache on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
    if device.type == "cpu":
        return cpu_peak_flops()
    return None


def cpu_peak_flops() -> float:
    """The higher of this run's measurement and the best one cached for this CPU and thread count;
    a better measurement is cached."""
    path, key = cache_path(), machine_key()
    known = read_cache(path).get(key, 0.0)
    measured = measure_matmul_flops()
    if measured > known:
        remember(path, key, measured)
    return max(measured, known)


def measure_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """Best-of-repeats fp32 matmul throughput of this CPU with torch's thread count, after a
    warm-up (a cold thread pool reads low). The best timing is the one least disturbed by other
    processes, the closest to the peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def cache_path() -> Path:
    """Where the measured peaks are kept: the XDG cache folder (a relative XDG_CACHE_HOME is
    ignored, as the XDG spec asks)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "gptlab" / CACHE_FILE


def machine_key() -> str:
    """The CPU model and torch's thread count: the two things a CPU's matmul peak depends on here."""
    return f"{cpu_model()} | {torch.get_num_threads()} threads"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "model name":
                    return value.strip()
    except OSError:
        pass  # not Linux: the platform's own name below
    return platform.processor() or platform.machine() or "unknown CPU"


def read_cache(path: Path) -> dict[str, float]:
    """The cached peaks; empty when the file is missing, unreadable or damaged."""
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(cached, dict):
        return {}
    return {
        k: float(v)
        for k, v in cached.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
    }


def remember(path: Path, key: str, flops: float) -> None:
    """Cache ``flops`` for ``key``; a cache that cannot be written is left as it is."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**read_cache(path), key: flops})
    except OSError:
        pass  # a read-only or full home costs the next run only its measurement
