"""Teacher-forced logits of the engine's decode paths against the math attention backend.

Free-running greedy tokens in bf16 cannot tell a bug from rounding: one rounding difference changes
every token after it. Here every path reads the same tokens (a prompt, then fixed "teacher"
tokens one step at a time) and its logits at each position are compared with those of one
forward over the whole sequence through PyTorch's math attention, in the same dtype: the largest
absolute difference, and how often the most likely token agrees, overall and where the reference's
top two are further apart than that largest difference (there, only a bug can disagree).

Paths: ``cuda_graphs`` (the fixed-shape step that CUDA graphs replay; eager on a CPU) and
``eager`` (the growing cache). One JSON line per path and batch size.

    python benchmarks/decode_logits.py --device cuda --dtype bfloat16 --shape llama-124m --batch-sizes 1,64
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gptlab.model
from benchmarks.common import DTYPES, SHAPES, device_name, emit, model_config
from benchmarks.preflight import attention_calls
from gptlab.engine import StaticDecodeStep
from gptlab.model import GPT, KVCache


@contextmanager
def math_attention():
    """Attention through the math backend only, also where the model limits the backends itself
    (``gptlab.model.ATTENTION_BACKENDS``, read at each call)."""
    own = getattr(gptlab.model, "ATTENTION_BACKENDS", None)
    if own is not None:
        gptlab.model.ATTENTION_BACKENDS = {use: [SDPBackend.MATH] for use in own}
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if own is not None:
            gptlab.model.ATTENTION_BACKENDS = own


def stepped_logits(model: GPT, ids: torch.Tensor, prompt_len: int, graphs: bool) -> torch.Tensor:
    """Logits (B, steps + 1, V) in fp32: the prompt's last position after its prefill, then one per
    teacher token fed one step at a time, through the fixed-shape step or the growing cache."""
    batch, length = ids.shape
    positions = torch.arange(length, device=ids.device).expand(batch, length)
    param = next(model.parameters())
    step = StaticDecodeStep(model, batch, length) if graphs else None
    cache = step.start(None) if step else KVCache(model.config, batch, length, param.device, param.dtype)
    try:
        hidden = model.hidden(ids[:, :prompt_len], positions[:, :prompt_len], None, cache)
        logits = [model.lm_head(hidden[:, -1]).float()]
        for t in range(prompt_len, length):
            token, position = ids[:, t : t + 1], positions[:, t : t + 1]
            if step:
                logits.append(step(token, position).clone())
            else:
                logits.append(model.lm_head(model.hidden(token, position, None, cache)[:, -1]).float())
    finally:
        if step:
            step.finish()
    return torch.stack(logits, dim=1)


def reference_logits(model: GPT, ids: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, list[str]]:
    """The logits of one forward over the whole sequence through the math backend, from the prompt's
    last position on, in fp32; and the attention backends that ran (math, unless the model forced another)."""
    out = []
    with math_attention():
        calls = attention_calls(lambda: out.append(model(ids)))
    return out[0][:, prompt_len - 1 :].float(), sorted({call["backend"] for call in calls})


def agreement(got: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (got - reference).abs().max().item()
    top2 = reference.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > diff
    same = got.argmax(-1) == reference.argmax(-1)
    return {
        "max_abs_diff": float(f"{diff:.3g}"),
        "max_abs_logit": round(reference.abs().max().item(), 4),
        "argmax_agreement": round(same.float().mean().item(), 4),
        "decisive_positions": int(decisive.sum()),
        "decisive_agreement": round(same[decisive].float().mean().item(), 4) if decisive.any() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--shape", default="llama-124m", choices=sorted(SHAPES))
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64, help="teacher tokens fed one at a time")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(model_config(args.shape)).to(args.device, DTYPES[args.dtype]).eval()
    length = args.prompt_len + args.steps
    for batch in map(int, args.batch_sizes.split(",")):
        ids = torch.randint(0, model.config.vocab_size, (batch, length), device=args.device)
        with torch.inference_mode():
            reference, backends = reference_logits(model, ids, args.prompt_len)
            for path in ("cuda_graphs", "eager"):
                got = stepped_logits(model, ids, args.prompt_len, graphs=path == "cuda_graphs")
                emit(
                    {
                        "benchmark": f"decode_logits_{args.dtype}",
                        "path": path,
                        "shape": args.shape,
                        "batch": batch,
                        "positions": got.size(1),
                        **agreement(got, reference),
                        "reference_backends": backends,
                        "device": device_name(args.device),
                    }
                )


if __name__ == "__main__":
    main()
