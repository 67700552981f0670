"""Train-step throughput: gptlab's GPT vs transformers' LlamaForCausalLM of the same shape.

One process, the same batch, forward + backward + AdamW step, interleaved repeats, medians.
Also reports MFU against the machine's measured matmul peak (CPU) or the bf16 table (GPU).

    python benchmarks/train_step.py [--shape tiny|small|llama-124m] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DTYPES, device_name, interleaved_medians, result_line
from gptlab.model import GPT, ModelConfig
from gptlab.train.loop import peak_flops

SHAPES = {
    # (n_embd, n_layer, n_head, vocab, seq_len, batch): tiny is the scale TinyWorld trains on a laptop.
    "tiny": (128, 4, 4, 2048, 128, 16),
    "small": (512, 8, 8, 8192, 256, 8),
    "llama-124m": (768, 12, 12, 50304, 1024, 16),  # GPT-2 small's widths in the llama family (untied: 162M), for a GPU
}


def hf_llama(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.n_embd,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head,
            max_position_embeddings=cfg.block_size,
            rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="autocast dtype (float32 = none)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()

    n_embd, n_layer, n_head, vocab, seq_len, batch = SHAPES[args.shape]
    cfg = ModelConfig(
        family="llama", vocab_size=vocab, block_size=seq_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd
    )
    torch.manual_seed(0)
    ours = GPT(cfg).to(args.device).train()
    peer = hf_llama(cfg).to(args.device).train()
    idx = torch.randint(0, vocab, (batch, seq_len), device=args.device)
    fused = torch.device(args.device).type == "cuda"
    optimizers = {
        "ours": torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=fused),
        "peer": torch.optim.AdamW(peer.parameters(), lr=1e-4, fused=fused),
    }
    autocast = (
        torch.autocast(torch.device(args.device).type, dtype=DTYPES[args.dtype])
        if args.dtype != "float32"
        else contextlib.nullcontext()
    )
    forward_ours = torch.compile(ours) if args.compile else ours
    forward_peer = torch.compile(peer) if args.compile else peer

    def step_ours():
        with autocast:
            loss = forward_ours(idx, idx)
        loss.backward()
        optimizers["ours"].step()
        optimizers["ours"].zero_grad(set_to_none=True)

    def step_peer():
        with autocast:
            loss = forward_peer(input_ids=idx, labels=idx).loss
        loss.backward()
        optimizers["peer"].step()
        optimizers["peer"].zero_grad(set_to_none=True)

    seconds, _ = interleaved_medians({"ours": step_ours, "peer": step_peer}, args.repeats, args.device)
    tokens = batch * seq_len
    ours_tps, peer_tps = tokens / seconds["ours"], tokens / seconds["peer"]
    peak = peak_flops(torch.device(args.device))
    flops = ours.flops_per_token(seq_len)
    print(
        f"shape {args.shape}: {ours.num_params():,} params, batch {batch} x {seq_len}, "
        f"{args.dtype}, {device_name(args.device)}"
    )
    print(f"{'':8}{'tok/s':>12}{'MFU':>8}")
    for name, tps in (("gptlab", ours_tps), ("hf", peer_tps)):
        mfu = f"{100 * tps * flops / peak:.1f}%" if peak else "n/a"
        print(f"{name:8}{tps:12,.0f}{mfu:>8}")
    print(f"peak matmul: {peak / 1e9:,.0f} GFLOP/s" if peak else "peak matmul: unknown")
    print(result_line(f"train_step_{args.shape}", ours_tps, peer_tps, "tok/s", args.device))


if __name__ == "__main__":
    main()
