"""Where a training step and a decode step spend the device's time: the profiler's table of the top
kernels (ops on a CPU) of one training step (forward, backward, fused AdamW), one eager decode step
and one replay of the CUDA-graph decode step, after a warm-up of each.

The tables go to the log; one JSON line per step gives its device time, its number of kernel
launches (op calls on a CPU) and its top kernels.

    python benchmarks/profile_steps.py --device cuda --train-shape gpt2-124m --decode-shape llama-124m
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHAPES, device_name, emit, model_config, synchronize
from gptlab.engine import StaticDecodeStep
from gptlab.model import GPT, KVCache

TOP = 12


def profiled(name: str, run, device: str) -> None:
    """Warm ``run`` up, profile one call, print the table and emit the step's line."""
    cuda = torch.device(device).type == "cuda"
    run()
    synchronize(device)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run()
        synchronize(device)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = sorted(prof.key_averages(), key=lambda a: getattr(a, sort), reverse=True)
    if cuda:
        averages = [a for a in averages if a.self_device_time_total > 0]
        launches = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    else:
        launches = sum(a.count for a in averages)
    total_us = sum(getattr(a, sort) for a in averages)
    print(f"=== {name}: top {TOP} of {launches} {'kernel launches' if cuda else 'op calls'}", flush=True)
    print(prof.key_averages().table(sort_by=sort, row_limit=TOP), flush=True)
    emit(
        {
            "benchmark": "profile",
            "step": name,
            "device_ms": round(total_us / 1000, 3),
            "launches": launches,
            "top": [
                {"name": a.key[:100], "ms": round(getattr(a, sort) / 1000, 3), "calls": a.count} for a in averages[:TOP]
            ],
            "device": device_name(device),
        }
    )


def train_step(shape: str, device: str, compile: bool):
    """One bf16-autocast (on CUDA) forward, backward and AdamW step of the shape's model."""
    cuda = torch.device(device).type == "cuda"
    *_, seq_len, batch = SHAPES[shape]
    model = GPT(model_config(shape)).to(device).train()
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    idx = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            forward(idx, idx).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def decode_steps(shape: str, device: str, batch: int, prompt_len: int = 32) -> dict:
    """One eager decode step over a growing cache, and one through the fixed-shape step (a CUDA
    graph's replay on CUDA), each after a prompt of ``prompt_len`` tokens, in bf16 on CUDA."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = GPT(model_config(shape)).to(device, dtype).eval()
    length = prompt_len + 64
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    token = prompt[:, -1:]
    cache = KVCache(model.config, batch, length, device, dtype)
    static = StaticDecodeStep(model, batch, length)
    with torch.inference_mode():
        model.hidden(prompt, None, None, cache)
        model.hidden(prompt, None, None, static.start(None))

    @torch.inference_mode()
    def eager():
        cache.pos = prompt_len  # the same slot every call: one step's work, repeated
        position = torch.full((batch, 1), prompt_len, device=device)
        return model.lm_head(model.hidden(token, position, None, cache)[:, -1]).float()

    @torch.inference_mode()
    def graph():
        static.cache.pos = prompt_len
        return static(token, torch.full((batch, 1), prompt_len, device=device))

    return {f"decode_b{batch}_eager": eager, f"decode_b{batch}_cuda_graph": graph}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-shape", default="gpt2-124m", choices=sorted(SHAPES))
    parser.add_argument("--decode-shape", default="llama-124m", choices=sorted(SHAPES))
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="profile the compiled training step")
    args = parser.parse_args()
    torch.manual_seed(0)
    train = "train_step_compiled" if args.compile else "train_step"
    profiled(f"{train}_{args.train_shape}", train_step(args.train_shape, args.device, args.compile), args.device)
    for name, run in decode_steps(args.decode_shape, args.device, args.decode_batch).items():
        profiled(name, run, args.device)


if __name__ == "__main__":
    main()
