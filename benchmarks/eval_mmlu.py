"""MMLU questions per second: ``gptlab eval`` vs ``lm_eval --model hf``, whole commands.

What is compared, and why: a user evaluates a checkpoint on an MMLU-layout folder, 5-shot, and
waits for the command to finish. Both sides run as that command in a fresh process (start-up,
imports, data loading, tokenization, the model, writing results and samples all count), on the
same checkpoint, data, device, batch size and fp32:

- ours: ``python -m gptlab eval --tasks mmlu --data DIR --shots 5 --samples ...``
- peer: ``python -m lm_eval run --model hf`` with task files equal to lm-eval's MMLU default over
  the same local CSVs (``gptlab.eval.lmeval``), ``--log_samples``, offline.

Runs interleave (ours, peer, ours, ...) after one untimed warm-up each; medians. Both sides must
predict the same choice for every question (checked from the two sample logs) or the script fails.

    python benchmarks/eval_mmlu.py                          # TinyWorld quick world_mmlu, ~1.4M-param model
    python benchmarks/eval_mmlu.py --model DIR --data MMLU_DIR --repeats 5 --threads 1

Without ``--model``, a llama-family model with random weights and a tokenizer trained on the
TinyWorld corpus is written (speed does not depend on what the weights learned); without
``--data``, the quick world's world_mmlu folder is used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import interleaved_medians, result_line  # noqa: E402
from gptlab.data.documents import read_jsonl  # noqa: E402


def make_checkpoint(work: Path, n_layer: int, n_embd: int, block_size: int) -> tuple[Path, Path]:
    """A TinyWorld quick world and a random-weight model folder with a tokenizer trained on it."""
    import torch

    from gptlab.data import iter_documents
    from gptlab.model import GPT, ModelConfig
    from gptlab.tokenizer import Tokenizer
    from gptlab.world import write_world

    world = work / "world"
    write_world(world, seed=0, preset="quick")
    tok = Tokenizer.train(iter_documents([world / "corpus"]), vocab_size=2048)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_head=4, n_embd=n_embd))
    model.save_pretrained(work / "model", tokenizer=tok)
    print(f"model: {model.num_params() / 1e6:.2f}M params, {n_layer} layers, width {n_embd}, block {block_size}")
    return work / "model", world / "bench" / "world_mmlu"


def gptlab_command(model: Path, data: Path, out: Path, args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gptlab",
        "eval",
        "--model",
        str(model),
        "--tasks",
        "mmlu",
        "--data",
        str(data),
        "--shots",
        str(args.shots),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--out",
        str(out / "results.json"),
        "--samples",
        str(out / "samples.jsonl"),
    ]


def run(command: list[str], env: dict) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"command failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: a random ~1.4M-param one)")
    parser.add_argument("--data", type=Path, help="an MMLU-layout folder (default: TinyWorld quick world_mmlu)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of both commands (OMP_NUM_THREADS); on a shared machine 1 suffers least "
        "from other jobs' load",
    )
    args = parser.parse_args()
    threads = {}
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)  # so the device line reports it
        threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    from gptlab.eval.lmeval import read_mmlu_samples, run_lm_eval_hf, write_mmlu_tasks
    from gptlab.eval.metrics import argmax

    with tempfile.TemporaryDirectory(prefix="eval_mmlu-") as tmp:
        work = Path(tmp)
        model, data = args.model, args.data
        if model is None or data is None:
            made_model, made_data = make_checkpoint(work, args.n_layer, args.n_embd, args.block_size)
            model, data = model or made_model, data or made_data
        group = write_mmlu_tasks(data, work / "tasks")
        ours_out, peer_out = work / "ours", work / "peer"
        ours_out.mkdir()
        ours_env = {**os.environ, **threads}

        def peer() -> None:
            done = run_lm_eval_hf(
                model, work / "tasks", group, peer_out, args.shots, args.batch_size, device=args.device, env=threads
            )
            if done.returncode != 0:
                sys.exit(f"lm_eval failed ({done.returncode}):\n{done.stderr[-3000:]}")

        contenders = {"ours": lambda: run(gptlab_command(model, data, ours_out, args), ours_env), "peer": peer}
        started = time.perf_counter()
        seconds, _ = interleaved_medians(contenders, args.repeats, args.device)

        ours = read_jsonl(ours_out / "samples.jsonl")
        theirs = read_mmlu_samples(peer_out, group)
        mismatches = sum(s["prediction"] != argmax(theirs[(s["subject"], s["doc_id"])]) for s in ours)
        largest = max(abs(a - b) for s in ours for a, b in zip(s["logprobs"], theirs[(s["subject"], s["doc_id"])]))
        questions = len(ours)
        if len(theirs) != questions or mismatches:
            sys.exit(f"predictions differ: {mismatches} of {questions} questions ({len(theirs)} scored by lm-eval)")
        results = json.loads((ours_out / "results.json").read_text())["results"]["mmlu"]
        print(f"data: {data} ({questions} questions, {args.shots}-shot, {results['truncated']} prompts cut)")
        print(f"gptlab eval:        {seconds['ours']:.2f} s  {questions / seconds['ours']:.1f} questions/s")
        print(f"lm_eval --model hf: {seconds['peer']:.2f} s  {questions / seconds['peer']:.1f} questions/s")
        print(
            f"identical predictions: {questions}/{questions}; largest log-likelihood difference {largest:.2e}; "
            f"accuracy {results['acc']:.4f}; wall {time.perf_counter() - started:.0f} s for "
            f"{args.repeats + 1} runs each"
        )
        print(
            result_line(
                "eval_mmlu", questions / seconds["ours"], questions / seconds["peer"], "questions/s", args.device
            )
        )


if __name__ == "__main__":
    main()
