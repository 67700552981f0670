"""Decode speed: gptlab's Engine against transformers' ``generate`` on the same weights.

A random transformers model is saved to a temporary folder and loaded into gptlab with
``GPT.from_pretrained``, so both sides run identical weights. Greedy decoding, equal-length
prompts and no EOS, so neither side stops early and both do the same number of steps.
Reports new tokens per second (medians of interleaved repeats) and how many tokens differ.

    python benchmarks/decode.py                                   # CPU, fp32, small Llama
    python benchmarks/decode.py --device cuda --dtype bfloat16 --shape llama-124m --peer-cache static
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DTYPES, interleaved_medians, result_line  # noqa: E402
from gptlab.engine import Engine  # noqa: E402
from gptlab.model import GPT  # noqa: E402

# name: (transformers class, its config). "tiny" and "small" suit a 2-core CPU; "gpt2-124m" is GPT-2 small.
SHAPES = {
    "tiny": (  # the scale TinyWorld models are trained at on a laptop
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(
            vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=512, rms_norm_eps=1e-5,
        ),
    ),
    "small": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(
            vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
            max_position_embeddings=1024, rms_norm_eps=1e-5,
        ),
    ),
    "llama-124m": (  # the GPU shape: GPT-2 small's widths in the llama family
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(
            vocab_size=50304, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=1024, rms_norm_eps=1e-5,
        ),
    ),
    "gpt2-124m": (
        transformers.GPT2LMHeadModel,
        transformers.GPT2Config(vocab_size=50304, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    ),
}


def main() -> None:
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
    parser.add_argument(
        "--peer-cache", choices=["dynamic", "static"], default="dynamic",
        help="transformers' KV cache: its default, or the static one it compiles (the GPU target's peer)",
    )
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]

    torch.manual_seed(0)
    cls, config = SHAPES[args.shape]
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None  # nothing can stop a row early
    peer = cls(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        peer.save_pretrained(folder)
        ours = GPT.from_pretrained(folder, device=args.device, dtype=dtype).eval()
    peer = peer.to(device=args.device, dtype=dtype)
    engine = Engine(ours, cuda_graphs=args.cuda_graphs)
    peer_cache = {"cache_implementation": "static"} if args.peer_cache == "static" else {}
    n = args.new_tokens

    print(f"shape {args.shape}: {ours.num_params() / 1e6:.1f}M parameters, {args.dtype} on {args.device}, "
          f"prompt {args.prompt_len} tokens, {n} new tokens, {args.repeats} repeats (medians)")
    print(f"{'batch':>5} {'ours tok/s':>11} {'peer tok/s':>11} {'ratio':>6} {'mismatched tokens':>18}")
    lines = []
    for batch in map(int, args.batch_sizes.split(",")):
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        input_ids = prompts.to(args.device)
        attention_mask = torch.ones_like(input_ids)

        def run_ours() -> list[list[int]]:
            return engine.generate(prompts.tolist(), n, temperature=0)

        def run_peer() -> list[list[int]]:
            with torch.inference_mode():
                out = peer.generate(
                    input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=n,
                    min_new_tokens=n, pad_token_id=0, **peer_cache,
                )
            return out[:, args.prompt_len:].tolist()

        seconds, outputs = interleaved_medians({"ours": run_ours, "peer": run_peer}, args.repeats, args.device)
        a, b = torch.tensor(outputs["ours"]), torch.tensor(outputs["peer"])
        assert a.shape == b.shape == (batch, n), f"a side stopped early: {tuple(a.shape)} vs {tuple(b.shape)}"
        mismatched = int((a != b).sum())
        rate = {name: batch * n / s for name, s in seconds.items()}
        print(f"{batch:>5} {rate['ours']:>11.1f} {rate['peer']:>11.1f} {rate['ours'] / rate['peer']:>6.2f} "
              f"{mismatched:>11} / {batch * n}")
        lines.append(result_line(f"decode_b{batch}", rate["ours"], rate["peer"], "tok/s", args.device))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
