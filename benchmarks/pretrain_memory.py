"""Peak memory of one training step with and without activation checkpointing.

The same model, weights and batch, one step (forward, backward, AdamW) with
``model.activation_checkpointing`` off and on. With it on, each block keeps only its input for
the backward pass and recomputes the rest there, one block at a time: activation memory should
drop by more than half, for about one extra forward pass of compute (the step times of both
are printed too, interleaved medians, for what the memory costs).

Two figures per variant, both above what was allocated before the step (weights, AdamW state:
a warm-up step creates that state first, so it is not counted):

- held after forward: what the forward pass leaves allocated for the backward pass (the
  activations proper);
- step peak: the highest allocation during the whole step (activations, the recomputation,
  gradients, temporaries). This is the figure that decides whether a batch fits.

How: on CUDA, ``torch.cuda.memory_allocated`` and ``max_memory_allocated``. On CPU the process's
RSS is useless here (it only grows, and the C allocator keeps what it frees), so the step runs
under ``torch.profiler`` with ``profile_memory=True``, which records every allocation and free
of torch's CPU allocator; their running sum gives the live bytes at every moment, exactly, with
no noise. Tensors saved for backward, counted with ``saved_tensors_hooks``, are not used: the
inputs that checkpointing keeps for recomputation are held outside autograd's saved tensors and
would be missed.

    python benchmarks/pretrain_memory.py                              # the cpu shape
    python benchmarks/pretrain_memory.py --shape llama-124m --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DTYPES, device_name, interleaved_medians, result_line
from benchmarks.pretrain_throughput import SHAPES
from gptlab.model import GPT, ModelConfig

MIB = 2**20


def cpu_step_memory(step, forward_done_marker: str) -> tuple[int, int]:
    """(bytes live when the forward pass ends, peak bytes) of ``step()`` on the CPU, counted from
    zero at the start: the running sum of the profiler's allocation (+) and free (-) records."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = list(prof.profiler.kineto_results.events())
    forward_end = next(e.end_ns() for e in events if e.name() == forward_done_marker)
    live = peak = 0
    held = None
    records = [e for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    for e in sorted(records, key=lambda e: e.start_ns()):
        if held is None and e.start_ns() > forward_end:
            held = live
        live += e.nbytes()
        peak = max(peak, live)
    return live if held is None else held, peak


def cuda_step_memory(step, device: torch.device) -> tuple[int, int]:
    """(bytes allocated when the forward pass ends, peak bytes) of ``step()`` above the start."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    held = step(report_held=lambda: torch.cuda.memory_allocated(device) - base)
    torch.cuda.synchronize(device)
    return held, torch.cuda.max_memory_allocated(device) - base


def measure(cfg: ModelConfig, checkpointing: bool, batch: int, seq_len: int, device: torch.device, autocast) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    model.activation_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=generator).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=generator).to(device)
    marker = "gptlab_bench_forward"

    def step(report_held=None):
        with torch.profiler.record_function(marker), autocast():
            loss = model(x, y)
        held = report_held() if report_held else None
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return held

    step()  # warm-up: AdamW's state is allocated here, once, by either variant
    if device.type == "cuda":
        held, peak = cuda_step_memory(step, device)
    else:
        held, peak = cpu_step_memory(step, marker)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"held": held, "peak": peak, "params": params, "num_params": model.num_params(), "step": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="cpu", help="(shapes of benchmarks/pretrain_throughput.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="autocast dtype (float32 = none)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the shape's)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed steps of each variant, interleaved (0: skip timing)"
    )
    args = parser.parse_args()

    n_embd, n_layer, n_head, vocab, seq_len, batch = SHAPES[args.shape]
    batch = args.batch or batch
    device = torch.device(args.device)
    cfg = ModelConfig(
        family="llama", vocab_size=vocab, block_size=seq_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd
    )

    def autocast():
        if args.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=DTYPES[args.dtype])

    results = {name: measure(cfg, on, batch, seq_len, device, autocast) for name, on in (("off", False), ("on", True))}
    off, on = results["off"], results["on"]
    seconds = {}
    if args.repeats:  # what the memory costs in time: the recomputation
        seconds, _ = interleaved_medians({"off": off["step"], "on": on["step"]}, args.repeats, args.device)
    print(
        f"shape {args.shape}: {off['num_params']:,} params ({off['params'] / MIB:.1f} MiB), "
        f"batch {batch} x {seq_len}, {args.dtype}, {device_name(args.device)}"
    )
    print(f"MiB above weights and optimizer state{'checkpointing off':>20}{'on':>8}{'on/off':>9}")
    for key, label in (("held", "held after forward (activations)"), ("peak", "step peak (fwd + bwd + AdamW)")):
        print(f"{label:37}{off[key] / MIB:20.1f}{on[key] / MIB:8.1f}{on[key] / off[key]:9.3f}")
    if seconds:
        print(
            f"{'step time, s (median of ' + str(args.repeats) + ', interleaved)':37}{seconds['off']:20.3f}"
            f"{seconds['on']:8.3f}{seconds['on'] / seconds['off']:9.3f}"
        )
    print(
        f"activation checkpointing cuts the step peak by {100 * (1 - on['peak'] / off['peak']):.0f}% "
        f"and the activations held by {100 * (1 - on['held'] / off['held']):.0f}% (target: at least 50%)"
    )
    print(
        result_line(
            f"pretrain_step_peak_memory_checkpointing_{args.shape}",
            on["peak"] / MIB,
            off["peak"] / MIB,
            "MiB",
            args.device,
        )
    )


if __name__ == "__main__":
    main()
