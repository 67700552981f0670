"""What a GPU run's figures depend on, recorded before them: the machine and its software, the
attention kernel that scaled_dot_product_attention picks for each shape gptlab runs, and the
largest bf16 matmul throughput the device shows next to its data sheet's peak (MFU divides by the
latter).

Each finding is one JSON line (``benchmark``: ``preflight``, ``attention_backend`` or
``matmul_bf16``). On a CPU it records the same at the tiny shape, where the attention kernels are
the CPU's and the matmul is fp32 (``gptlab.train.mfu``'s measured peak).

    python benchmarks/preflight.py [--device cuda] [--shape gpt2-124m]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gptlab.model
from benchmarks.common import SHAPES, device_name, emit, model_config, synchronize
from gptlab.engine import Engine
from gptlab.model import GPT
from gptlab.train.mfu import GPU_PEAK_FLOPS, peak_flops

# The dispatcher's kernel ops under aten::scaled_dot_product_attention, by the backend they belong to.
ATTENTION_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
GPU_QUERY = "name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,driver_version"


def software(device: str) -> dict:
    """Versions, the device, and on CUDA its clocks as nvidia-smi reports them."""
    record = {"benchmark": "preflight", "device": device_name(device), "python": platform.python_version()}
    record["torch"] = torch.__version__
    for name in ("transformers", "triton"):
        try:
            record[name] = __import__(name).__version__
        except ImportError:
            record[name] = None
    record["cpu_threads"] = torch.get_num_threads()
    allowed = getattr(gptlab.model, "ATTENTION_BACKENDS", None)  # the kernels the model lets SDPA choose from
    record["attention_backends_allowed"] = {use: [b.name for b in kinds] for use, kinds in (allowed or {}).items()}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            nvidia_smi=nvidia_smi(),
        )
    return record


def nvidia_smi() -> dict | str:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return f"unavailable: {e}"
    return dict(zip(GPU_QUERY.split(","), (value.strip() for value in out.split(","))))


def attention_calls(run) -> list[dict]:
    """The scaled_dot_product_attention calls ``run()`` makes: their query shapes, key lengths, masks
    and the kernel the dispatcher chose, one entry per combination (key lengths as a range)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    seen: dict[str, dict] = {}
    for event in prof.events():
        if event.name != "aten::scaled_dot_product_attention":
            continue
        kernels = [ATTENTION_KERNELS[c.name] for c in event.cpu_children if c.name in ATTENTION_KERNELS]
        query, key = event.input_shapes[0], event.input_shapes[1]
        mask = event.input_shapes[3] if len(event.input_shapes) > 3 and event.input_shapes[3] else None
        entry = {"query": query, "mask": mask and mask[:-1], "backend": kernels[0] if kernels else "unknown"}
        found = seen.setdefault(str(entry), {**entry, "key_lens": [key[-2], key[-2]]})
        found["key_lens"] = [min(found["key_lens"][0], key[-2]), max(found["key_lens"][1], key[-2])]
    return list(seen.values())


def probe_attention(shape: str, device: str) -> None:
    """The backend of each attention call of a training step (bf16 autocast on CUDA) and of the
    engine's prefill and decode steps (bf16 weights on CUDA, with and without CUDA graphs), on one
    block of the shape's widths: the choice depends on the shapes and dtypes, not on the depth."""
    *_, vocab, seq_len, batch = SHAPES[shape]
    cuda = torch.device(device).type == "cuda"
    torch.manual_seed(0)
    model = GPT(model_config(shape, n_layer=1)).to(device).train()
    idx = torch.randint(0, vocab, (batch, seq_len), device=device)

    def train_step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cuda):
            model(idx, idx).backward()

    uses = {"training": train_step}
    model = model.to(torch.bfloat16 if cuda else torch.float32).eval()
    for rows in (1, 64):
        prompts = torch.randint(0, vocab, (rows, 32)).tolist()
        for graphs in (True, False) if cuda else (False,):
            engine = Engine(model, cuda_graphs=graphs)
            name = f"generate_b{rows}" + ("_cuda_graphs" if graphs else "")
            uses[name] = lambda engine=engine, prompts=prompts: engine.generate(prompts, 4, temperature=0)
    for use, run in uses.items():
        if not use.endswith("_cuda_graphs"):  # a graph's replays dispatch no ops: its capture is what is recorded
            run()  # warm-up: lazy initialisation stays out of the record
        for call in attention_calls(run):
            emit({"benchmark": "attention_backend", "shape": shape, "use": use, **call, "device": device_name(device)})


def matmul_throughput(device: str, n: int = 8192, repeats: int = 20) -> None:
    """The best of ``repeats`` timed n x n x n bf16 matmuls, next to the data sheet's peak."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    measured = 2 * n**3 / best
    datasheet = peak_flops(torch.device(device))
    emit(
        {
            "benchmark": "matmul_bf16",
            "n": n,
            "tflops": round(measured / 1e12, 1),
            "datasheet_tflops": round(datasheet / 1e12, 1) if datasheet else None,
            "fraction_of_datasheet": round(measured / datasheet, 3) if datasheet else None,
            "device": device_name(device),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated (default: gpt2-124m,llama-124m on CUDA, tiny)")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    emit(software(args.device))
    for shape in (args.shapes or ("gpt2-124m,llama-124m" if cuda else "tiny")).split(","):
        probe_attention(shape, args.device)
    if cuda:
        matmul_throughput(args.device)
    else:
        emit({"benchmark": "matmul_fp32", "gflops": round(peak_flops(torch.device("cpu")) / 1e9, 1), "device": "cpu"})
    print(f"data sheet peaks known (dense bf16): {', '.join(GPU_PEAK_FLOPS)}", flush=True)


if __name__ == "__main__":
    main()
