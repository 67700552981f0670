"""Decode speed: gptlab's Engine against transformers' ``generate`` on the same weights.

A random transformers model is saved to a temporary folder and loaded into gptlab with
``GPT.from_pretrained``, so both sides run identical weights. Greedy decoding, equal-length
prompts and no EOS, so neither side stops early and both do the same number of steps.
Reports new tokens per second (medians of repeats) and where the outputs part, if they do: a JSON
line per contender and batch size (with its MFU: memory-bound decode reaches little) and one per
gptlab engine and transformers cache compared. Repeats interleave the contenders (fair on a shared
CPU), or with ``--ours-first`` each is timed in turn, gptlab first, and printed as soon as measured.

    python benchmarks/decode.py                                   # CPU, fp32, small Llama
    python benchmarks/decode.py --device cuda --dtype bfloat16 --shape llama-124m --batch-sizes 1,64 \\
        --peer-caches static,dynamic --eager-too --ours-first
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DTYPES, comparison, device_name, emit, interleaved_medians, mfu, timed_median
from gptlab.engine import Engine
from gptlab.model import GPT

# name: (transformers class, its config). "tiny" and "small" suit a 2-core CPU; "gpt2-124m" is GPT-2 small.
SHAPES = {
    "tiny": (  # the scale TinyWorld models are trained at on a laptop
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(
            vocab_size=2048,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
        ),
    ),
    "small": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            max_position_embeddings=1024,
            rms_norm_eps=1e-5,
        ),
    ),
    "llama-124m": (  # the GPU shape: GPT-2 small's widths in the llama family
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(
            vocab_size=50304,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=1024,
            rms_norm_eps=1e-5,
        ),
    ),
    "gpt2-124m": (
        transformers.GPT2LMHeadModel,
        transformers.GPT2Config(vocab_size=50304, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    ),
}


def divergence(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    """How far two (batch, n) token tables agree: rows identical, and where the others first differ.
    In bf16 one rounding difference changes the rest of a row, so a count of differing tokens
    says little; the first differing step says when the two decoders parted."""
    differs = ours != theirs
    same_rows = int((~differs.any(dim=1)).sum())
    text = f"{same_rows}/{ours.size(0)} rows identical"
    if same_rows < ours.size(0):
        first = differs.float().argmax(dim=1)[differs.any(dim=1)]
        text += f", the others first differ at step {int(first.min())}-{int(first.max())}"
    return text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=True, help="gptlab's decode steps on CUDA"
    )
    parser.add_argument("--eager-too", action="store_true", help="on CUDA, also time gptlab without CUDA graphs")
    parser.add_argument(
        "--peer-caches",
        default="dynamic",
        help="comma-separated transformers KV caches, each timed as a peer: dynamic (its default) and/or "
        "static (which transformers compiles on CUDA: the GPU target's peer)",
    )
    parser.add_argument(
        "--ours-first",
        action="store_true",
        help="time each contender in turn, gptlab first, printing each figure as soon as it is measured",
    )
    args = parser.parse_args()
    args.peer_caches = list(dict.fromkeys(args.peer_caches.split(",")))
    if not set(args.peer_caches) <= {"dynamic", "static"}:
        parser.error(f"--peer-caches takes dynamic and/or static, got {','.join(args.peer_caches)}")
    return args


def contenders(batch: int, engines: dict, peer, cache_options: dict, args) -> dict:
    """Each contender's greedy decode of the same ``batch`` prompts, gptlab's engines first."""
    vocab = peer.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
    input_ids = prompts.to(args.device)
    n = args.new_tokens
    runs = {
        name: (lambda engine=engine: engine.generate(prompts.tolist(), n, temperature=0))
        for name, engine in engines.items()
    }

    def run_peer(options: dict) -> list[list[int]]:
        with torch.inference_mode():
            out = peer.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
                **options,
            )
        return out[:, args.prompt_len :].tolist()

    for cache in args.peer_caches:
        runs[f"hf {cache}"] = lambda options=cache_options[cache]: run_peer(options)
    return runs


def measure_batch(batch: int, engines: dict, peer, cache_options: dict, flops_per_token: float, args) -> None:
    """Time every contender on one batch size; print and emit each one's figure (gptlab's first) and
    then each comparison, so a later batch size that runs out of time loses only its own lines."""
    runs = contenders(batch, engines, peer, cache_options, args)
    n = args.new_tokens

    def figure(name: str, seconds: float) -> None:
        rate = batch * n / seconds
        emit(
            {
                "benchmark": f"decode_b{batch}",
                "contender": name,
                "tok_per_s": round(rate, 1),
                "mfu": mfu(rate * flops_per_token, args.device),
                "new_tokens": n,
                "prompt_len": args.prompt_len,
                "dtype": args.dtype,
                "device": device_name(args.device),
            }
        )

    if args.ours_first:
        seconds, outputs = {}, {}
        for name, run in runs.items():
            seconds[name], outputs[name] = timed_median(run, args.repeats, args.device)
            figure(name, seconds[name])
    else:
        seconds, outputs = interleaved_medians(runs, args.repeats, args.device)
        for name in runs:
            figure(name, seconds[name])
    tables = {name: torch.tensor(out) for name, out in outputs.items()}
    for name, table in tables.items():
        assert table.shape == (batch, n), f"{name} stopped early: {tuple(table.shape)}"
    rate = {name: batch * n / s for name, s in seconds.items()}
    print(f"batch {batch}:")
    for name in runs:
        ratio = "" if name == "gptlab" else f"  gptlab is {rate['gptlab'] / rate[name]:.2f}x"
        agree = "" if name == "gptlab" else f"  ({divergence(tables['gptlab'], tables[name])})"
        print(f"  {name:14} {rate[name]:>10.1f} tok/s{ratio}{agree}")
    on_cuda = torch.device(args.device).type == "cuda"
    for name, engine in engines.items():
        graphs = "" if engine.cuda_graphs or not on_cuda else "_nographs"
        for cache in args.peer_caches:
            ours_mfu = mfu(rate[name] * flops_per_token, args.device)
            benchmark = f"decode_b{batch}_vs_hf_{cache}{graphs}"
            emit(comparison(benchmark, rate[name], rate[f"hf {cache}"], "tok/s", args.device, mfu_ours=ours_mfu))


def main() -> None:
    args = parse_args()
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    cls, config = SHAPES[args.shape]
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None  # nothing can stop a row early
    peer = cls(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        peer.save_pretrained(folder)
        ours = GPT.from_pretrained(folder, device=args.device, dtype=dtype).eval()
    peer = peer.to(device=args.device, dtype=dtype)
    on_cuda = torch.device(args.device).type == "cuda"
    engines = {"gptlab": Engine(ours, cuda_graphs=args.cuda_graphs)}
    if args.eager_too and args.cuda_graphs and on_cuda:
        engines["gptlab eager"] = Engine(ours)
    cache_options = {"dynamic": {}, "static": {"cache_implementation": "static"}}
    if on_cuda and hasattr(transformers, "CompileConfig"):
        # Static shapes, as transformers 4.x compiled them: 5.x would otherwise recompile the
        # second batch size with a dynamic batch dimension.
        cache_options["static"]["compile_config"] = transformers.CompileConfig(dynamic=False)
    # A decoded token's forward FLOPs (a third of training's), attending over the mean context length.
    flops_per_token = ours.flops_per_token(args.prompt_len + args.new_tokens // 2) / 3
    timing = "each in turn, gptlab first" if args.ours_first else "interleaved"
    print(
        f"shape {args.shape}: {ours.num_params() / 1e6:.1f}M parameters, {args.dtype} on {device_name(args.device)}, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, {args.repeats} repeats ({timing}, medians), "
        f"transformers {transformers.__version__}, torch {torch.__version__}",
        flush=True,
    )
    for batch in map(int, args.batch_sizes.split(",")):
        measure_batch(batch, engines, peer, cache_options, flops_per_token, args)
    if "static" in args.peer_caches:
        print(f"transformers compiled its static-cache forward: {getattr(peer, '_compiled_call', None) is not None}")


if __name__ == "__main__":
    main()
