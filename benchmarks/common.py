"""Helpers shared by the benchmarks: timing contenders, MFU, and the JSON lines tools read.

On a shared machine timings interleave the contenders (ours, peer, ours, peer, ...) so that drift in
its load hits both alike, and report medians, which one slow repeat does not move. On a GPU lent for
a few minutes each contender is timed in turn, gptlab first, and each figure is printed as its own
JSON line as soon as it is measured (``emit``), so that a step cut off by its deadline loses only
the figures it had not reached.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable

import torch

from gptlab.model import ModelConfig
from gptlab.train.mfu import peak_flops

# When set, every emitted JSON line is also appended to this file (gpu_check.sh's results.jsonl).
RESULTS_ENV = "BENCHMARK_RESULTS"

# name: (family, n_embd, n_layer, n_head, vocab, seq_len, batch). tiny is the scale TinyWorld trains on a laptop;
# the 124m shapes are GPT-2 small's, in its own family (nanoGPT's MFU shape) and in the llama family (162M untied).
SHAPES = {
    "tiny": ("llama", 128, 4, 4, 2048, 128, 16),
    "small": ("llama", 512, 8, 8, 8192, 256, 8),
    "llama-124m": ("llama", 768, 12, 12, 50304, 1024, 16),
    "gpt2-124m": ("gpt2", 768, 12, 12, 50304, 1024, 16),
}


def model_config(shape: str, **overrides) -> ModelConfig:
    """The ModelConfig of a ``SHAPES`` entry (block size: its sequence length), with ``overrides``."""
    family, n_embd, n_layer, n_head, vocab, seq_len, _ = SHAPES[shape]
    fields = dict(family=family, vocab_size=vocab, block_size=seq_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    return ModelConfig(**{**fields, **overrides})


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


def timed_median(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, object]:
    """Median wall seconds per call of ``fn`` after one untimed warm-up call, and that call's output."""
    output = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), output


def mfu(flops_per_second: float, device: str) -> float | None:
    """Model FLOPs utilisation against the device's peak (``gptlab.train.mfu``); None where unknown."""
    peak = peak_flops(torch.device(device))
    return round(flops_per_second / peak, 4) if peak else None


def emit(record: dict) -> None:
    """Print ``record`` as one JSON line now, and append it to the file $BENCHMARK_RESULTS names."""
    line = json.dumps(record)
    print(line, flush=True)
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class CompileWatch:
    """Counts torch.compile's graph breaks and recompiles while open (their reasons go to stderr, as
    ``TORCH_LOGS=graph_breaks,recompiles`` shows them)."""

    RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"

    def __enter__(self) -> CompileWatch:
        from torch._dynamo.utils import counters

        self.counters = counters
        counters.clear()
        torch._logging.set_logs(graph_breaks=True, recompiles=True)
        self.recompiles = 0
        self.handler = logging.Handler()
        self.handler.emit = self._count
        logging.getLogger(self.RECOMPILES_LOGGER).addHandler(self.handler)
        return self

    def _count(self, record: logging.LogRecord) -> None:
        if "Recompiling function" in record.getMessage():
            self.recompiles += 1

    def __exit__(self, *exc) -> None:
        logging.getLogger(self.RECOMPILES_LOGGER).removeHandler(self.handler)

    def summary(self) -> dict:
        """The counts so far, and the first lines of the graph breaks' reasons."""
        breaks = self.counters["graph_break"]
        return {
            "graph_breaks": sum(breaks.values()),
            "recompiles": self.recompiles,
            "graphs": self.counters["stats"]["unique_graphs"],
            "graph_break_reasons": sorted({reason.splitlines()[0][:160] for reason in breaks}),
        }


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def comparison(benchmark: str, ours: float, peer: float, unit: str, device: str, **fields) -> dict:
    """The record of one comparison that tools read from a benchmark's output; ``fields`` (such as each
    side's MFU) go before the device."""
    return {
        "benchmark": benchmark,
        "ours": round(ours, 2),
        "peer": round(peer, 2),
        "ratio": round(ours / peer, 3),
        "unit": unit,
        **fields,
        "device": device_name(device),
    }


def result_line(benchmark: str, ours: float, peer: float, unit: str, device: str, **fields) -> str:
    """``comparison`` as the one JSON line per measurement."""
    return json.dumps(comparison(benchmark, ours, peer, unit, device, **fields))
