"""Operators in one decode step of gptlab's Engine, counted with torch.profiler on the CPU.

Small-batch decode on a GPU is bound by the launch cost of its many small kernels, so the number
of operators a step runs is the figure to keep down, and a CPU can count it. A step here is
everything ``Engine.generate`` does per new token (the model's one-token forward, the greedy
pick, the mask and position slices, the host read of the token): the operators of a generation
of ``2 * STEPS + 1`` tokens minus those of one of ``STEPS + 1``, divided by ``STEPS`` (what both
do once, the prefill and the setup, cancels).

Two counts per step:
- ``kernels``: leaf aten operators that compute or copy (no view, no allocation): on CUDA each
  launches about one kernel;
- ``ops``: top-level aten operators (a view or an allocation counts; what Python dispatches).

Modes: ``eager`` (the growing cache, what runs without CUDA graphs), ``static`` (the fixed-shape
step that a CUDA graph captures, run eagerly here), each at batch 1 and, with ``--padded``, at
batch 2 with prompts of different lengths (a mask).

    python benchmarks/decode_kernels.py                  # 12-layer tiny llama, fp32 and bf16
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DTYPES, device_name
from gptlab.engine import Engine
from gptlab.model import GPT, ModelConfig

STEPS = 4
PROMPTS = {"batch1": [[5, 17, 3, 90, 41, 8, 22, 11]], "padded": [[5, 17, 3, 90, 41, 8, 22, 11], [60, 61, 62]]}

OPERATORS = ("aten::", "mkldnn::")  # mkldnn: the CPU's prepacked linear layers
# Operators that launch no kernel on a GPU: views and metadata, allocations, no-op conversions and
# checks, and scalars made on the host.
NO_KERNEL = {
    "aten::view",
    "aten::_unsafe_view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::as_strided",
    "aten::transpose",
    "aten::permute",
    "aten::t",
    "aten::slice",
    "aten::select",
    "aten::narrow",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::expand",
    "aten::split",
    "aten::split_with_sizes",
    "aten::unflatten",
    "aten::unbind",
    "aten::chunk",
    "aten::alias",
    "aten::detach",
    "aten::detach_",
    "aten::lift_fresh",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::resize_",
    "aten::result_type",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::to",
    "aten::type_as",
    "aten::contiguous",
    "aten::dropout",
    "aten::scalar_tensor",
}
# Operators that the CPU runs as several but CUDA as one fused kernel: counted once.
FUSED = {
    "aten::_fused_rms_norm",
    "aten::native_layer_norm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::zero_",  # a fill, which the CPU splits further for large tensors only
}


def tiny_llama(n_layer: int = 12, dtype: torch.dtype = torch.float32) -> GPT:
    """The GPU target's layout (llama, as many K/V heads as query heads) at CPU-sized widths, in
    ``dtype`` with fp32 rotary tables, as ``GPT.from_pretrained(..., dtype=dtype)`` loads one."""
    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=2048, block_size=256, n_layer=n_layer, n_head=4, n_embd=128)
    model = GPT(config).to(dtype).eval()
    model.init_rope()
    return model


def operator_counts(fn) -> tuple[Counter, Counter]:
    """(top-level aten operators, kernel operators) that ``fn()`` runs, by name. A kernel operator
    computes or copies and runs no kernel operator inside it; a ``FUSED`` one counts once."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    top, kernels = Counter(), Counter()

    def count_kernels(event) -> bool:
        """Count ``event``'s kernels; whether it ran any."""
        if event.name in FUSED:
            kernels[event.name] += 1
            return True
        inside = [count_kernels(child) for child in event.cpu_children]  # a list: every child is counted
        if any(inside):
            return True
        if event.name.startswith(OPERATORS) and event.name not in NO_KERNEL:
            kernels[event.name] += 1
            return True
        return False

    for event in prof.events():
        if event.cpu_parent is None:
            count_kernels(event)
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(OPERATORS):
            parent = parent.cpu_parent
        if parent is None and event.name.startswith(OPERATORS):
            top[event.name] += 1
    return top, kernels


@contextmanager
def static_decode_on_cpu():
    """The engine's fixed-shape decode step on the CPU (run eagerly there, as the tests run it)."""
    devices = Engine.STATIC_DECODE_DEVICES
    Engine.STATIC_DECODE_DEVICES = (*devices, "cpu")
    try:
        yield
    finally:
        Engine.STATIC_DECODE_DEVICES = devices


def step_counts(model: GPT, mode: str, prompts: list[list[int]]) -> dict:
    """Operators per decode step: ``kernels`` and ``ops`` (totals) and ``by_name`` (kernels)."""
    with static_decode_on_cpu() if mode == "static" else _nothing():
        engine = Engine(model, cuda_graphs=mode == "static")

        def generate(new_tokens: int):
            return lambda: engine.generate(prompts, new_tokens, temperature=0)

        generate(STEPS + 1)()  # warm-up: packs the oneDNN weights, builds the fixed-shape step
        few, lots = operator_counts(generate(STEPS + 1)), operator_counts(generate(2 * STEPS + 1))
    per_step = []
    for shorter, longer in zip(few, lots):
        diff = longer.copy()
        diff.subtract(shorter)
        if any(count % STEPS for count in diff.values()):
            raise RuntimeError(f"steps differ in their operators: {dict(diff)}")
        per_step.append(Counter({name: count // STEPS for name, count in diff.items() if count}))
    return {"kernels": sum(per_step[1].values()), "ops": sum(per_step[0].values()), "by_name": per_step[1]}


@contextmanager
def _nothing():
    yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    parser.add_argument("--padded", action="store_true", help="also batch 2 with a padded prompt (a mask)")
    parser.add_argument("--by-name", action="store_true", help="list each step's kernel operators by name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__} on {device_name('cpu')}, {args.layers}-layer tiny llama, {STEPS} steps")
    batches = ["batch1", "padded"] if args.padded else ["batch1"]
    for dtype_name in args.dtypes.split(","):
        model = tiny_llama(args.layers, DTYPES[dtype_name])
        for mode in ("eager", "static"):
            for batch in batches:
                counts = step_counts(model, mode, PROMPTS[batch])
                line = {"benchmark": f"decode_step_ops_{mode}_{batch}", "dtype": dtype_name, "layers": args.layers}
                print(json.dumps({**line, "kernels": counts["kernels"], "ops": counts["ops"]}))
                if args.by_name:
                    for name, count in counts["by_name"].most_common():
                        print(f"    {count:5d}  {name}")


if __name__ == "__main__":
    main()
