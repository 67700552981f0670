"""`gptlab demo`: the whole pipeline on TinyWorld, through the same commands a user would run.

world -> tokenizer -> shards -> pretraining -> samples -> ``report.md`` with a loss-curve plot,
data statistics, samples, timings and the machine. Each later stage (evaluation, SFT,
preferences, arena, ladder) adds itself here and to the report when it lands.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.cli import main as gptlab
from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer


@dataclass(frozen=True)
class DemoPreset:
    world: str  # TinyWorld preset
    vocab_size: int
    model: tuple[str, ...]  # --set overrides for pretraining
    train: tuple[str, ...]


PRESETS = {
    "quick": DemoPreset(
        world="quick",
        vocab_size=1024,
        model=("model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=256"),
        train=("train.max_steps=250", "train.batch_size=16", "train.seq_len=128", "train.lr=3e-3",
               "train.warmup_steps=20", "train.eval_every=50", "train.eval_batches=4", "train.save_every=125",
               "train.log_every=10"),
    ),
    "default": DemoPreset(
        world="default",
        vocab_size=2048,
        model=("model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=256"),
        train=("train.max_steps=1000", "train.batch_size=16", "train.seq_len=256", "train.lr=3e-3",
               "train.warmup_steps=50", "train.eval_every=100", "train.eval_batches=8", "train.save_every=250",
               "train.log_every=10"),
    ),
}

def sample_prompts(world: Path) -> list[tuple[str, str]]:
    """(prompt, expected) pairs on held-out items: a fact about a held-out person, an addition
    answered directly and step by step, and a two-shot word reversal."""

    def first(path: Path, n: int = 1) -> list[dict]:
        with path.open() as f:
            return [json.loads(next(f)) for _ in range(n)]

    truth = json.loads((world / "world.json").read_text())
    person = next(p for p in truth["people"] if p["split"] == "test")
    add = first(world / "bench" / "arith" / "add_2_test.jsonl")[0]
    answer = add["answer"].rsplit("#### ", 1)[1]
    shots = first(world / "bench" / "words" / "reverse_fewshot.jsonl", 2)
    word = first(world / "bench" / "words" / "reverse_test.jsonl")[0]
    episode = "".join(f"{s['input']} -> {s['output']}\n" for s in shots) + f"{word['input']} ->"
    return [
        (f"Q: In which city was {person['name']} born? A:", person["birth_city"]),
        (f"Q: {add['question']} A:", answer),
        (f"Q: {add['question']} A: Let's think step by step.", answer),
        (episode, word["output"]),
    ]


def stage(name: str, args: list[str], timings: dict) -> None:
    """Run one gptlab command as a user would, with a progress line and its wall time."""
    print(f"== demo: {name}: gptlab {' '.join(args)}", flush=True)
    start = time.perf_counter()
    code = gptlab(args)
    timings[name] = time.perf_counter() - start
    if code != 0:
        raise UserError(f"the demo's {name} stage failed (exit {code}); see the message above")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{cpu}; {device}; Python {platform.python_version()}, torch {torch.__version__}"


def plot_losses(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["tokens"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    tokens_per_step = metrics[-1]["tokens"] / metrics[-1]["step"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot([s * tokens_per_step for s, _ in val], [v for _, v in val], "o-", label="val loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Pretraining on TinyWorld")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out: Path, preset: str = "quick", seed: int = 0) -> Path:
    if preset not in PRESETS:
        raise UserError(f"unknown demo preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    stage("world", ["world", "--out", str(out / "world"), "--seed", str(seed), "--preset", spec.world, "--force"], timings)
    stage("tokenizer", ["tokenizer", "--input", str(out / "world" / "corpus"), "--vocab-size", str(spec.vocab_size),
                        "--out", str(out / "tokenizer")], timings)
    stage("prepare", ["prepare", "--tokenizer", str(out / "tokenizer"), "--input", str(out / "world" / "corpus"),
                      "--out", str(out / "shards"), "--val-fraction", "0.02", "--overwrite"], timings)
    sets = [f"data.shards={out / 'shards'}", f"train.seed={seed}", *spec.model, *spec.train]
    base = out / "base"
    stage("pretrain", ["pretrain", "--out", str(base), *sum((["--set", s] for s in sets), [])], timings)

    print("== demo: samples", flush=True)
    model = GPT.from_pretrained(base / "model")
    engine = Engine(model, Tokenizer.from_pretrained(base / "model"))
    samples = [
        (prompt, expected, engine.generate_text(prompt, max_new_tokens=40, temperature=0.0).split("\n")[0])
        for prompt, expected in sample_prompts(out / "world")
    ]
    timings["total"] = time.perf_counter() - started

    metrics = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
    plot_losses(metrics, out / "loss.png")
    meta = json.loads((out / "shards" / "meta.json").read_text())
    report = render_report(preset, seed, model, meta, metrics, samples, timings)
    (out / "report.md").write_text(report)
    print(report)
    return out / "report.md"


def cell(text: str) -> str:
    """Model text inside a markdown table cell: literal, one line, no table or code breaks."""
    return text.replace("\n", " / ").replace("|", "\\|").replace("`", "'")


def render_report(preset, seed, model: GPT, meta: dict, metrics: list[dict], samples, timings: dict) -> str:
    train_losses = [m for m in metrics if "loss" in m]
    first, last = train_losses[0], train_losses[-1]
    val = [m for m in metrics if "val_loss" in m]
    lines = [
        "# gptlab demo report",
        "",
        f"Preset `{preset}`, seed {seed}. Machine: {machine()}.",
        "",
        "## Data",
        "",
        "| split | documents | tokens |",
        "|---|---|---|",
        *(f"| {split} | {info['documents']:,} | {info['tokens']:,} |" for split, info in meta["splits"].items()),
        "",
        f"Tokenizer: byte-level BPE, {meta['vocab_size']:,} tokens.",
        "",
        "## Pretraining",
        "",
        f"llama, {model.num_params():,} parameters ({model.config.n_layer} layers, width {model.config.n_embd}), "
        f"{last['step']} steps, {last['tokens']:,} tokens.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| train loss at step {first['step']} | {first['loss']:.3f} |",
        f"| train loss at step {last['step']} | {last['loss']:.3f} |",
        *([f"| val loss at step {val[0]['step']} | {val[0]['val_loss']:.3f} |",
           f"| val loss at step {val[-1]['step']} | {val[-1]['val_loss']:.3f} |"] if val else []),
        f"| throughput (last log window) | {last['tok_per_s']:,.0f} tokens/s |",
        f"| peak memory | {last['peak_mem_mb']:,.0f} MB |",
        "",
        "![loss curve](loss.png)",
        "",
        "## Samples on held-out items (greedy, first line)",
        "",
        "| prompt | expected | model |",
        "|---|---|---|",
        *(f"| `{cell(prompt)}` | `{cell(expected)}` | `{cell(completion)}` |" for prompt, expected, completion in samples),
        "",
        "## Timings",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()),
        "",
    ]
    return "\n".join(lines)
