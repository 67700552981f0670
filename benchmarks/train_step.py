"""Train-step throughput: gptlab's GPT vs transformers' model of the same shape (Llama or GPT-2).

One process, the same batch, forward + backward + AdamW step, medians of repeats, and each one's
MFU against the machine's measured matmul peak (CPU) or the data sheet's bf16 peak (GPU). By default
the repeats interleave the two (fair on a shared CPU) and the figures print at the end; with
``--ours-first`` gptlab is timed alone and its JSON line printed before transformers' model is even
built, so a run cut off by its deadline keeps it. With ``--compile`` each line also counts
torch.compile's graph breaks and recompiles.

    python benchmarks/train_step.py [--shape tiny|small|llama-124m|gpt2-124m] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--compile] [--ours-first]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    DTYPES,
    SHAPES,
    CompileWatch,
    comparison,
    device_name,
    emit,
    interleaved_medians,
    mfu,
    model_config,
    timed_median,
)
from gptlab.model import GPT, ModelConfig


def hf_model(cfg: ModelConfig):
    """transformers' model of ``cfg``'s shape, without dropout, attention through SDPA."""
    import transformers

    if cfg.family == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=cfg.vocab_size,
                n_embd=cfg.n_embd,
                n_layer=cfg.n_layer,
                n_head=cfg.n_head,
                n_positions=cfg.block_size,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                attn_implementation="sdpa",
            )
        )
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
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


def training_step(model, forward, idx, device: str, autocast, peer: bool):
    """One forward + backward + fused (on CUDA) AdamW step of ``model`` on ``idx`` predicting itself."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(device).type == "cuda")

    def step():
        with autocast:
            loss = forward(input_ids=idx, labels=idx).loss if peer else forward(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="autocast dtype (float32 = none)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, help="sequences per step (default: the shape's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--ours-first", action="store_true", help="time gptlab alone first and print it at once")
    args = parser.parse_args()

    *_, vocab, seq_len, batch = SHAPES[args.shape]
    batch = args.batch or batch
    cfg = model_config(args.shape)
    torch.manual_seed(0)
    idx = torch.randint(0, vocab, (batch, seq_len), device=args.device)
    autocast = (
        torch.autocast(torch.device(args.device).type, dtype=DTYPES[args.dtype])
        if args.dtype != "float32"
        else contextlib.nullcontext()
    )
    benchmark, tokens = f"train_step_{args.shape}", batch * seq_len
    ours = GPT(cfg).to(args.device).train()
    flops = ours.flops_per_token(seq_len)
    print(
        f"shape {args.shape}: {ours.num_params():,} params, batch {batch} x {seq_len}, {args.dtype}, "
        f"compile {args.compile}, {device_name(args.device)}",
        flush=True,
    )

    def build(name: str):
        model = ours if name == "gptlab" else hf_model(cfg).to(args.device).train()
        forward = torch.compile(model) if args.compile else model
        return training_step(model, forward, idx, args.device, autocast, peer=name != "gptlab")

    def figure(name: str, seconds: float, **fields) -> float:
        rate = tokens / seconds
        emit(
            {
                "benchmark": benchmark,
                "contender": name,
                "tok_per_s": round(rate, 1),
                "mfu": mfu(rate * flops, args.device),
                "step_ms": round(1000 * seconds, 2),
                "batch": batch,
                "seq_len": seq_len,
                "dtype": args.dtype,
                "compile": args.compile,
                **fields,
                "device": device_name(args.device),
            }
        )
        return rate

    rates = {}
    if args.ours_first:
        for name in ("gptlab", "hf"):
            with CompileWatch() if args.compile else contextlib.nullcontext() as watch:
                seconds, _ = timed_median(build(name), args.repeats, args.device)
                rates[name] = figure(name, seconds, **(watch.summary() if watch else {}))
    else:
        seconds, _ = interleaved_medians({name: build(name) for name in ("gptlab", "hf")}, args.repeats, args.device)
        rates = {name: figure(name, s) for name, s in seconds.items()}
    mfus = {f"mfu_{side}": mfu(rates[name] * flops, args.device) for side, name in (("ours", "gptlab"), ("peer", "hf"))}
    emit(comparison(benchmark, rates["gptlab"], rates["hf"], "tok/s", args.device, **mfus))


if __name__ == "__main__":
    main()
