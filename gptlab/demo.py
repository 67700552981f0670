"""`gptlab demo`: the whole pipeline on TinyWorld, through the same commands a user would run.

world -> tokenizer -> shards -> a ladder of model sizes (pretraining + evaluation of each) -> SFT of
the largest -> a reward model and DPO from the SFT model -> instruction following of the base model
(few-shot) and the SFT model (zero-shot), the reward model's held-out accuracy and DPO against SFT
-> ``report.md`` with plots: data statistics, the pretraining curve, the scaling ladder and its
phenomena table, in-context learning with intervals, instruction tuning, learning from
preferences, samples, timings and the machine. The report is one ``Section`` per stage in pipeline order: a later stage
(preferences, arena) adds its section function and one line in ``run_demo``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gptlab import stats
from gptlab.align.reward import RewardScorer
from gptlab.chat import ChatSession
from gptlab.data.documents import jsonl_records, read_jsonl
from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.eval import GptlabBackend, evaluate, warnings_as_lines
from gptlab.fileio import write_text_atomic
from gptlab.ladder import run_folder
from gptlab.model import GPT
from gptlab.report import NOT_YET, Claim, Section, concatenate, format_points, ladder_section, plot_pretraining_loss
from gptlab.runs import RunFolder
from gptlab.world.oracle import Oracle

# Runs one gptlab command line (``gptlab.cli.main``) and returns its exit code. The CLI passes
# itself in, so this module, which the CLI imports, never imports the CLI back.
Command = Callable[[list[str]], int]

INSTRUCT_SHOTS = 3  # examples that show the base model the answer format the SFT model learned
REPLY_TOKENS = 48  # longer than any reference answer of the families the preference pairs cover


@dataclass(frozen=True)
class DemoPreset:
    world: str  # TinyWorld preset
    vocab_size: int
    ladder: str  # ladder preset
    ladder_sets: tuple[str, ...]  # --set overrides on top of it
    sft_sets: tuple[str, ...]
    reward_sets: tuple[str, ...]
    dpo_sets: tuple[str, ...]  # a live reference: cheaper than precomputing every pair for runs under an epoch
    instruct_limit: int  # test conversations per instruction family


PRESETS = {
    "quick": DemoPreset(
        world="quick",
        vocab_size=263,
        ladder="quick",
        ladder_sets=("sizes.depths=[1, 2, 3]", "sizes.tokens_per_param=4", "eval.limit=20"),
        sft_sets=("train.max_steps=60", "train.eval_every=0", "train.save_every=0"),
        reward_sets=("train.max_steps=40", "train.eval_every=0", "train.save_every=0"),
        dpo_sets=("train.max_steps=40", "train.eval_every=0", "train.save_every=0", "precompute_ref=false"),
        instruct_limit=10,
    ),
    "default": DemoPreset(
        world="default",
        vocab_size=263,
        ladder="default",
        ladder_sets=(),
        sft_sets=("train.max_steps=300", "train.eval_every=100", "train.save_every=0"),
        # 80 steps each, evaluated once at the end: both stages fit the 4 minutes [prefs] allows them
        # on a 2-core CPU (100 steps each with a mid-run evaluation took 108 s + 158 s).
        reward_sets=("train.max_steps=80", "train.eval_every=0", "train.save_every=0"),
        dpo_sets=("train.max_steps=80", "train.eval_every=0", "train.save_every=0", "precompute_ref=false"),
        instruct_limit=50,
    ),
}


def first_records(path: Path, n: int) -> list[dict]:
    return [record for _, record in itertools.islice(jsonl_records(path), n)]


def sample_prompts(world: Path, truth: dict) -> list[tuple[str, str]]:
    """(prompt, expected) pairs on held-out items of the world (``truth``: its world.json): a fact
    about a held-out person, an addition answered directly and step by step, and a two-shot word
    reversal."""
    person = next(p for p in truth["people"] if p["split"] == "test")
    add = first_records(world / "bench" / "arith" / "add_2_test.jsonl", 1)[0]
    answer = add["answer"].rsplit("#### ", 1)[1]
    shots = first_records(world / "bench" / "words" / "reverse_fewshot.jsonl", 2)
    word = first_records(world / "bench" / "words" / "reverse_test.jsonl", 1)[0]
    episode = "".join(f"{s['input']} -> {s['output']}\n" for s in shots) + f"{word['input']} ->"
    return [
        (f"Q: In which city was {person['name']} born? A:", person["birth_city"]),
        (f"Q: {add['question']} A:", answer),
        (f"Q: {add['question']} A: Let's think step by step.", answer),
        (episode, word["output"]),
    ]


def stage(gptlab: Command, name: str, args: list[str], timings: dict) -> None:
    """Run one gptlab command as a user would, with a progress line and its wall time."""
    print(f"== demo: {name}: gptlab {' '.join(args)}", flush=True)
    start = time.perf_counter()
    code = gptlab(args)
    timings[name] = time.perf_counter() - start
    if code != 0:
        raise UserError(f"the demo's {name} stage failed (exit {code}); see the message above")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as lines:
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{cpu}; {device}; Python {platform.python_version()}, torch {torch.__version__}"


def run_demo(out: Path, gptlab: Command, preset: str = "quick", seed: int = 0) -> Path:
    """The demo in ``out``; ``gptlab`` runs each stage's command line (the CLI's ``main``)."""
    if preset not in PRESETS:
        raise UserError(f"unknown demo preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    demo = RunFolder(out)
    if demo.has_record() and demo.read_record().get("kind") != "demo":
        raise UserError(f"{out} holds another gptlab run (see its run.json); give the demo a new --out")
    demo.write_record("demo", {"preset": preset, **asdict(spec)}, seed=seed)
    world = out / "world"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    base, tuned = run_stages(gptlab, out, spec, seed, timings)
    reward_run, dpo_run = preference_stages(gptlab, out, spec, tuned, seed, timings)

    print("== demo: instruction following and samples", flush=True)
    start = time.perf_counter()
    base_engine, tuned_engine = Engine.from_pretrained(base.model_dir), Engine.from_pretrained(tuned.model_dir)
    truth = json.loads((world / "world.json").read_text())
    held_out = truth["sft"]["held_out"]
    with warnings_as_lines():
        instruct = instruction_following(world, held_out, base_engine, tuned_engine, spec.instruct_limit)
    samples = [
        (prompt, expected, base_engine.generate_text(prompt, max_new_tokens=60, temperature=0.0).split("\n")[0])
        for prompt, expected in sample_prompts(world, truth)
    ]
    conversations = chat_samples(world, held_out, tuned_engine)
    preferences = preference_results(
        world, reward_run.model_dir, tuned_engine, Engine.from_pretrained(dpo_run.model_dir)
    )
    timings["evaluation and samples"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - started

    report = concatenate(
        [
            Section(f"# gptlab demo report\n\nPreset `{preset}`, seed {seed}. Machine: {machine()}."),
            data_section(json.loads((out / "shards" / "meta.json").read_text())),
            pretraining_section(base, base_engine.model, out / "loss.png"),
            ladder_section(
                out / "ladder", extra=alignment_claims(instruct, preferences), heading="##", link_prefix="ladder/"
            ),
            instruction_tuning_section(instruct, conversations),
            preferences_section(preferences),
            samples_section(samples),
            timings_section(timings),
        ]
    )
    write_text_atomic(demo.report_path, report)
    print(report)
    return demo.report_path


def run_stages(gptlab: Command, out: Path, spec: DemoPreset, seed: int, timings: dict) -> tuple[RunFolder, RunFolder]:
    """The pipeline's commands, as a user would type them, up to SFT; returns the base model's
    run (the ladder's largest) and the SFT run."""
    world = out / "world"
    stage(
        gptlab, "world", ["world", "--out", str(world), "--seed", str(seed), "--preset", spec.world, "--force"], timings
    )
    stage(
        gptlab,
        "tokenizer",
        [
            "tokenizer",
            "--input",
            str(world / "corpus"),
            "--vocab-size",
            str(spec.vocab_size),
            "--out",
            str(out / "tokenizer"),
        ],
        timings,
    )
    stage(
        gptlab,
        "prepare",
        [
            "prepare",
            "--tokenizer",
            str(out / "tokenizer"),
            "--input",
            str(world / "corpus"),
            "--out",
            str(out / "shards"),
            "--val-fraction",
            "0.02",
            "--overwrite",
        ],
        timings,
    )
    ladder_sets = [f"data.world={world}", f"data.shards={out / 'shards'}", f"train.seed={seed}", *spec.ladder_sets]
    stage(
        gptlab,
        "ladder",
        [
            "ladder",
            "--preset",
            spec.ladder,
            "--out",
            str(out / "ladder"),
            *sum((["--set", s] for s in ladder_sets), []),
        ],
        timings,
    )
    ladder = json.loads((out / "ladder" / "ladder.json").read_text())
    base, tuned = run_folder(out / "ladder", ladder["runs"][-1]["name"]), RunFolder(out / "sft")
    sft_sets = [
        f"init={base.model_dir}",
        f"data.train={world / 'sft' / 'train.jsonl'}",
        f"train.seed={seed}",
        *spec.sft_sets,
    ]
    stage(
        gptlab,
        "sft",
        ["sft", "--out", str(tuned.path), "--overwrite", *sum((["--set", s] for s in sft_sets), [])],
        timings,
    )
    return base, tuned


def preference_stages(
    gptlab: Command, out: Path, spec: DemoPreset, tuned: RunFolder, seed: int, timings: dict
) -> tuple[RunFolder, RunFolder]:
    """A reward model and DPO, both from the SFT model on the world's preference pairs."""
    prefs = out / "world" / "prefs"
    common = [
        f"init={tuned.model_dir}",
        f"data.train={prefs / 'train.jsonl'}",
        f"data.val={prefs / 'test.jsonl'}",
        f"train.seed={seed}",
    ]
    runs = RunFolder(out / "reward"), RunFolder(out / "dpo")
    for name, run, sets in (("reward", runs[0], spec.reward_sets), ("dpo", runs[1], spec.dpo_sets)):
        overrides = sum((["--set", s] for s in (*common, *sets)), [])
        stage(gptlab, name, [name, "--out", str(run.path), "--overwrite", *overrides], timings)
    return runs


def instruction_following(world: Path, held_out: list[str], base: Engine, tuned: Engine, limit: int) -> dict:
    """The base model prompted with a few examples vs the SFT model asked zero-shot, on the
    held-out test conversations of every instruction family, scored by the oracle."""
    held_out = set(held_out)
    runs = {
        "base": evaluate(
            GptlabBackend.from_engine(base),
            ["world_instruct"],
            world,
            shots=[INSTRUCT_SHOTS],
            limit=limit,
            return_samples=True,
        ),
        "sft": evaluate(
            GptlabBackend.from_engine(tuned),
            ["world_instruct"],
            world,
            shots=[0],
            chat=True,
            limit=limit,
            return_samples=True,
        ),
    }
    scores = {
        name: {(s["subject"], s["doc_id"]): float(s["correct"]) for s in r["samples"]} for name, r in runs.items()
    }
    items = sorted(scores["base"])
    families = sorted({family for family, _ in items})
    result: dict = {"families": {}, "groups": {}}
    for family in families:
        keys = [i for i in items if i[0] == family]
        result["families"][family] = {
            "held_out": family in held_out,
            "n": len(keys),
            **{name: sum(scores[name][k] for k in keys) / len(keys) for name in scores},
        }
    for group, members in (("held-out families", held_out), ("seen families", set(families) - held_out)):
        keys = [i for i in items if i[0] in members]
        if keys:
            base_values = [scores["base"][k] for k in keys]
            sft_values = [scores["sft"][k] for k in keys]
            result["groups"][group] = {
                "n": len(keys),
                "base": sum(base_values) / len(keys),
                "sft": sum(sft_values) / len(keys),
                "effect": stats.difference_interval(base_values, sft_values, paired=True),
            }
    return result


def replies(engine: Engine, prompts: list[list[dict]]) -> list[str]:
    """Greedy chat replies to ``prompts`` (message lists), one batch per 32 prompts."""
    tokenizer = engine.tokenizer
    rendered = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    out = []
    for start in range(0, len(rendered), 32):
        tokens = engine.generate(
            rendered[start : start + 32], REPLY_TOKENS, temperature=0.0, stop_ids=[tokenizer.end_id]
        )
        out += [tokenizer.decode([t for t in row if t != tokenizer.end_id], skip_special_tokens=True) for row in tokens]
    return out


def preference_results(world: Path, reward_dir: Path, sft: Engine, dpo: Engine) -> dict:
    """The reward model's accuracy on the held-out pairs per kind of rejected answer, and the DPO
    model against the SFT model on the held-out prompts, judged by the oracle."""
    pairs = read_jsonl(world / "prefs" / "test.jsonl")
    scorer = RewardScorer.from_pretrained(reward_dir)
    chosen = scorer.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    correct: dict[str, list[float]] = {}
    for pair, c, r in zip(pairs, chosen, rejected):
        correct.setdefault(pair["kind"], []).append(float(c > r))
    correct["all"] = [v for values in correct.values() for v in values]
    prompts = list({json.dumps(p["prompt"]): p["prompt"] for p in pairs}.values())
    answers = {"sft": replies(sft, prompts), "dpo": replies(dpo, prompts)}
    oracle = Oracle(world)
    verdicts = [oracle.judge(p, d, s) for p, d, s in zip(prompts, answers["dpo"], answers["sft"])]
    points = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}
    return {
        "reward_accuracy": {kind: stats.bootstrap_mean_interval(v) for kind, v in correct.items()},
        "reward_n": {kind: len(v) for kind, v in correct.items()},
        "win_rate": stats.bootstrap_mean_interval([points[v] for v in verdicts]),
        "verdicts": {v: verdicts.count(v) for v in points},
        "prompts": len(prompts),
        "models": {
            name: {
                "score": sum(oracle.score(p, a) for p, a in zip(prompts, texts)) / len(prompts),
                "words": sum(len(a.split()) for a in texts) / len(prompts),
            }
            for name, texts in answers.items()
        },
        "example": (prompts[0], answers["sft"][0], answers["dpo"][0]),
    }


def chat_samples(world: Path, held_out: list[str], tuned: Engine) -> list[tuple[str, str, str]]:
    """(family, question, reply) for the first test conversation of each held-out family."""
    samples = []
    rows = read_jsonl(world / "sft" / "test.jsonl")
    for family in held_out:
        row = next((r for r in rows if r["family"] == family), None)
        if row is None:
            continue
        system = next((m["content"] for m in row["messages"] if m["role"] == "system"), None)
        question = next(m["content"] for m in row["messages"] if m["role"] == "user")
        session = ChatSession(tuned, system=system, max_new_tokens=60, temperature=0.0)
        samples.append((family, question, "".join(session.reply(question))))
    return samples


def cell(text: str) -> str:
    """Model text inside a markdown table cell: literal, one line, no table or code breaks."""
    return text.replace("\n", " / ").replace("|", "\\|").replace("`", "'")


# ---------------------------------------------------------------------------------------------
# The report's sections, in pipeline order (the ladder's comes from gptlab.report)


def data_section(meta: dict) -> Section:
    """The corpus the shards hold (``meta``: their meta.json) and the tokenizer."""
    return Section(
        "\n".join(
            [
                "## Data",
                "",
                "| split | documents | tokens |",
                "|---|---|---|",
                *(
                    f"| {split} | {info['documents']:,} | {info['tokens']:,} |"
                    for split, info in meta["splits"].items()
                ),
                "",
                f"Tokenizer: byte-level BPE, {meta['vocab_size']:,} tokens.",
            ]
        )
    )


def pretraining_section(base: RunFolder, model: GPT, plot: Path) -> Section:
    """The base model's pretraining run; its loss curve is written to ``plot``, beside the report."""
    metrics = base.read_metrics()
    plot_pretraining_loss(metrics, plot)
    train_losses = [m for m in metrics if "loss" in m]
    first, last = train_losses[0], train_losses[-1]
    val = [m for m in metrics if "val_loss" in m]
    return Section(
        "\n".join(
            [
                "## Pretraining (the ladder's largest model, the base of SFT)",
                "",
                (
                    f"llama, {model.num_params():,} parameters "
                    f"({model.config.n_layer} layers, width {model.config.n_embd}), "
                    f"{last['step']} steps, {last['tokens']:,} tokens."
                ),
                "",
                "| measure | value |",
                "|---|---|",
                f"| train loss at step {first['step']} | {first['loss']:.3f} |",
                f"| train loss at step {last['step']} | {last['loss']:.3f} |",
                *([f"| val loss at step {val[-1]['step']} | {val[-1]['val_loss']:.3f} |"] if val else []),
                f"| throughput (last log window) | {last['tok_per_s']:,.0f} tokens/s |",
                f"| peak memory | {last['peak_mem_mb']:,.0f} MB |",
                "",
                f"![loss curve]({plot.name})",
            ]
        ),
        [plot],
    )


def alignment_claims(instruct: dict, preferences: dict) -> list[Claim]:
    """The phenomena table's rows after the ladder's: instruction tuning and DPO as measured here,
    then what later stages will measure."""
    claim = Claim(
        "Instruction tuning gives zero-shot gains on unseen tasks",
        f"SFT zero-shot minus base {INSTRUCT_SHOTS}-shot, held-out instruction families (oracle-scored)",
    )
    held = instruct["groups"].get("held-out families")
    if held:
        claim.effect, claim.lo, claim.hi = held["effect"]
        if claim.lo <= 0:
            claim.note = "if no: a larger base model or more SFT steps"
    win, lo, hi = preferences["win_rate"]
    dpo = Claim(
        "DPO moves a model toward human preferences",
        "DPO's win rate against the SFT model minus 50%, held-out prompts (oracle-judged, ties half)",
        win - 0.5,
        lo - 0.5,
        hi - 0.5,
    )
    if lo <= 0.5:
        both_wrong = preferences["verdicts"]["tie (bothbad)"] / preferences["prompts"]
        dpo.note = (
            f"if no: both replies are wrong on {both_wrong:.0%} of prompts, and DPO wins only where it fixes a "
            "wrong SFT answer: a model that knows more facts, not more DPO steps (docs/alignment.md)"
        )
    return [claim, dpo, *(c for c in NOT_YET if not c.claim.startswith(("Instruction", "DPO")))]


def instruction_tuning_section(instruct: dict, conversations: list[tuple[str, str, str]]) -> Section:
    """The base model few-shot vs the SFT model zero-shot (``instruction_following``), and the SFT
    model's replies on held-out families (``chat_samples``)."""
    return Section(
        "\n".join(
            [
                "## Instruction tuning",
                "",
                (
                    f"The base model is prompted with {INSTRUCT_SHOTS} solved examples of the same family "
                    "(`Q: ... A: ...`); the SFT model gets the question alone through its chat template. "
                    "The oracle scores correctness. "
                    "Effects in points with paired 95% bootstrap intervals."
                ),
                "",
                f"| families | questions | base {INSTRUCT_SHOTS}-shot | SFT zero-shot | SFT - base [95% CI] |",
                "|---|---|---|---|---|",
                *(
                    f"| {group} | {g['n']} | {g['base'] * 100:.1f} | {g['sft'] * 100:.1f} "
                    f"| {format_points(g['effect'])} |"
                    for group, g in instruct["groups"].items()
                ),
                "",
                "| family | held out | questions | base | SFT |",
                "|---|---|---|---|---|",
                *(
                    f"| {family} | {'yes' if f['held_out'] else ''} | {f['n']} "
                    f"| {f['base'] * 100:.0f} | {f['sft'] * 100:.0f} |"
                    for family, f in instruct["families"].items()
                ),
                "",
                "Conversations with the SFT model on held-out families (greedy):",
                "",
                "| family | user | assistant |",
                "|---|---|---|",
                *(f"| {family} | {cell(question)} | {cell(reply)} |" for family, question, reply in conversations),
            ]
        )
    )


def preferences_section(result: dict) -> Section:
    """The reward model's held-out accuracy and DPO against SFT (``preference_results``)."""
    mean, lo, hi = result["win_rate"]
    sft, dpo = result["models"]["sft"], result["models"]["dpo"]
    prompt, sft_reply, dpo_reply = result["example"]
    return Section(
        "\n".join(
            [
                "## Learning from preferences",
                "",
                "The reward model and DPO both start from the SFT model and learn from `prefs/train.jsonl` "
                "(pairs whose rejected answer is wrong, or right but breaking one style rule). "
                "Held-out: `prefs/test.jsonl`.",
                "",
                "Reward model: held-out accuracy (chosen scored above rejected), 95% bootstrap intervals.",
                "",
                "| rejected answer | pairs | accuracy [95% CI] |",
                "|---|---|---|",
                *(
                    f"| {kind} | {result['reward_n'][kind]} | {acc * 100:.1f} [{low * 100:.1f}, {high * 100:.1f}] |"
                    for kind, (acc, low, high) in result["reward_accuracy"].items()
                ),
                "",
                (
                    f"DPO against SFT on {result['prompts']} held-out prompts (greedy replies, judged by the "
                    f"oracle; ties count half): DPO wins **{mean * 100:.1f}%** [{lo * 100:.1f}, {hi * 100:.1f}]."
                ),
                "",
                "| DPO better | tie | SFT better | both wrong (tie) |",
                "|---|---|---|---|",
                "| {model_a} | {tie} | {model_b} | {tie (bothbad)} |".format_map(result["verdicts"]),
                "",
                "| model | oracle score | mean reply length (words) |",
                "|---|---|---|",
                f"| SFT | {sft['score']:.3f} | {sft['words']:.1f} |",
                f"| DPO | {dpo['score']:.3f} | {dpo['words']:.1f} |",
                "",
                "A longer DPO reply at an equal or lower score is DPO's known length exploitation.",
                "",
                "| user | SFT | DPO |",
                "|---|---|---|",
                f"| {cell(prompt[-1]['content'])} | {cell(sft_reply)} | {cell(dpo_reply)} |",
            ]
        )
    )


def samples_section(samples: list[tuple[str, str, str]]) -> Section:
    """The base model's greedy completions of ``sample_prompts``: (prompt, expected, completion)."""
    return Section(
        "\n".join(
            [
                "## Base-model samples on held-out items (greedy, first line)",
                "",
                "| prompt | expected | model |",
                "|---|---|---|",
                *(
                    f"| `{cell(prompt)}` | `{cell(expected)}` | `{cell(completion)}` |"
                    for prompt, expected, completion in samples
                ),
            ]
        )
    )


def timings_section(timings: dict[str, float]) -> Section:
    return Section(
        "\n".join(
            [
                "## Timings",
                "",
                "| stage | seconds |",
                "|---|---|",
                *(f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()),
            ]
        )
    )
