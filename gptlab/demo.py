"""`gptlab demo`: the whole pipeline on TinyWorld, through the same commands a user would run.

world -> tokenizer -> shards -> a ladder of model sizes (pretraining + evaluation of each) -> SFT of
the largest -> a reward model and DPO from the SFT model -> PPO of the SFT model against the reward
model, and GRPO of the SFT model on arithmetic questions (``reward=arith``) -> instruction following
of the base model (few-shot) and the SFT model (zero-shot), the reward model's held-out accuracy, DPO
and PPO against SFT, and held-out arithmetic before and after GRPO -> ``report.md`` with plots: data
statistics, the pretraining curve, the scaling ladder and its phenomena table, in-context learning
with intervals, instruction tuning, learning from preferences, RL from feedback, samples, timings and
the machine. The report is one ``Section`` per stage in pipeline order: a later stage (the arena)
adds its section function and one line in ``run_demo``. The phenomena table's rows are also written
to ``claims.json``: ``--seeds N`` runs the demo once per seed into ``seed-S/`` and reports each claim
across the seeds from those files (``run_demo_seeds``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gptlab import stats
from gptlab.align.reward import RewardScorer
from gptlab.align.reward_functions import arith, gold_number
from gptlab.align.rollouts import record_prompt
from gptlab.arena.agreement import mean_scores, rank_agreement
from gptlab.arena.battles import WINNERS
from gptlab.arena.board import Board
from gptlab.arena.store import ArenaStore
from gptlab.chat import ChatSession, chat_replies
from gptlab.data.documents import jsonl_records, read_jsonl
from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.eval import GptlabBackend, evaluate, warnings_as_lines
from gptlab.fileio import write_text_atomic
from gptlab.ladder import run_folder
from gptlab.model import GPT
from gptlab.report import (
    ARENA,
    CLAIMS_FILE,
    DPO,
    GRPO_ROWS,
    INSTRUCTION_TUNING,
    PPO_ROWS,
    RLHF,
    Claim,
    Section,
    concatenate,
    first_to_last_rows,
    format_points,
    ladder_section,
    plot_pretraining_loss,
    plot_rl_curves,
    read_claims,
    robustness_section,
    write_claims,
)
from gptlab.runs import RunFolder
from gptlab.world.oracle import Oracle

# Runs one gptlab command line (``gptlab.cli.main``) and returns its exit code. The CLI passes
# itself in, so this module, which the CLI imports, never imports the CLI back.
Command = Callable[[list[str]], int]

INSTRUCT_SHOTS = 3  # examples that show the base model the answer format the SFT model learned
REPLY_TOKENS = 48  # longer than any reference answer of the families the preference pairs cover
ARITH_FAMILIES = ("add", "subtract", "multiply")  # TinyWorld's arithmetic instruction families
ARITH_REPLY_TOKENS = 24  # "The answer is 223355." and its end-of-turn token, with room to spare
# What the report shows of the PPO and GRPO runs' metrics (of their cards' rows, gptlab.report)
PPO_DEMO_ROWS = (
    "objective/scores",
    "objective/kl",
    "objective/rlhf_reward",
    "completions/mean_length",
    "val/num_eos_tokens",
)
GRPO_DEMO_ROWS = ("reward", "frac_reward_zero_std", "completions/mean_length")
ARENA_ALIGNED = ("sft", "dpo", "ppo", "grpo")  # the arena's models after the ladder's sizes
UNDECIDED_ARENA = "every model is rated alike (every battle a tie: no model answers a prompt right; a larger preset)"


@dataclass(frozen=True)
class DemoPreset:
    world: str  # TinyWorld preset
    vocab_size: int
    ladder: str  # ladder preset
    ladder_sets: tuple[str, ...]  # --set overrides on top of it
    sft_sets: tuple[str, ...]
    reward_sets: tuple[str, ...]
    dpo_sets: tuple[str, ...]  # a live reference: cheaper than precomputing every pair for runs under an epoch
    ppo_sets: tuple[str, ...]  # train.max_steps: a multiple of ppo_epochs (4) x num_mini_batches (1)
    grpo_sets: tuple[str, ...]
    instruct_limit: int  # test conversations per instruction family
    arena_prompts: int  # held-out preference prompts the arena's models answer (each model answers each once)
    arena_rounds: int  # battles per pair of models


PRESETS = {
    "quick": DemoPreset(
        world="quick",
        vocab_size=263,
        ladder="quick",
        ladder_sets=("sizes.depths=[1, 2, 3]", "sizes.tokens_per_param=4", "eval.limit=20"),
        sft_sets=("train.max_steps=60", "train.eval_every=0", "train.save_every=0"),
        reward_sets=("train.max_steps=40", "train.eval_every=0", "train.save_every=0"),
        dpo_sets=("train.max_steps=40", "train.eval_every=0", "train.save_every=0", "precompute_ref=false"),
        ppo_sets=("train.max_steps=8", "train.batch_size=8", "train.log_every=4", "train.save_every=0"),
        grpo_sets=("train.max_steps=2", "train.batch_size=16", "train.log_every=1", "train.save_every=0"),
        instruct_limit=10,
        arena_prompts=17,  # one per family
        arena_rounds=4,
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
        # PPO and GRPO within the 6 minutes [rl] allows them on a 2-core CPU: 17 s + 15 s measured on an idle machine
        # (2026-12-03); with other work on the cores, torch's two threads wait on each other (492 s at load 8).
        ppo_sets=("train.max_steps=32", "train.log_every=4", "train.save_every=0"),
        grpo_sets=("train.max_steps=16", "train.log_every=2", "train.save_every=0"),
        instruct_limit=50,
        arena_prompts=51,  # three per family
        arena_rounds=12,
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


def demo_preset(preset: str) -> DemoPreset:
    if preset not in PRESETS:
        raise UserError(f"unknown demo preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def run_demo(out: Path, gptlab: Command, preset: str = "quick", seed: int = 0) -> Path:
    """The demo in ``out``; ``gptlab`` runs each stage's command line (the CLI's ``main``)."""
    spec = demo_preset(preset)
    demo = RunFolder(out)
    if demo.has_record() and demo.read_record().get("kind") != "demo":
        raise UserError(f"{out} holds another gptlab run (see its run.json); give the demo a new --out")
    demo.write_record("demo", {"preset": preset, **asdict(spec)}, seed=seed)
    (out / CLAIMS_FILE).unlink(missing_ok=True)  # a demo run again is not finished (``seed_done``) until it ends
    timings: dict[str, float] = {}
    started = time.perf_counter()
    base, tuned = run_stages(gptlab, out, spec, seed, timings)
    reward_run, dpo_run = preference_stages(gptlab, out, spec, tuned, seed, timings)
    ppo_run, grpo_run = rl_stages(gptlab, out, spec, tuned, reward_run, seed, timings)
    runs = {"base": base, "sft": tuned, "reward": reward_run, "dpo": dpo_run, "ppo": ppo_run, "grpo": grpo_run}
    arena_db = arena_stage(gptlab, out, spec, contestants(out / "ladder", runs), seed, timings)

    print("== demo: evaluation and samples", flush=True)
    start = time.perf_counter()
    results = measure(out / "world", spec, runs)
    results["arena"] = arena_results(out / "world", arena_db, seed)
    timings["evaluation and samples"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - started

    ladder = ladder_section(
        out / "ladder",
        extra=alignment_claims(results["instruct"], results["preferences"], results["arena"]),
        heading="##",
        link_prefix="ladder/",
    )
    report = concatenate(
        [
            Section(f"# gptlab demo report\n\nPreset `{preset}`, seed {seed}. Machine: {machine()}."),
            data_section(json.loads((out / "shards" / "meta.json").read_text())),
            pretraining_section(base, results["base_model"], out / "loss.png"),
            ladder,
            instruction_tuning_section(results["instruct"], results["conversations"]),
            preferences_section(results["preferences"]),
            rl_section(ppo_run, grpo_run, results["preferences"]["ppo"], results["arithmetic"], out / "ppo.png"),
            arena_section(results["arena"], out / "arena.png"),
            samples_section(results["samples"]),
            timings_section(timings),
        ]
    )
    write_claims(out / CLAIMS_FILE, ladder.claims)
    write_text_atomic(demo.report_path, report)
    print(report)
    return demo.report_path


def run_demo_seeds(out: Path, gptlab: Command, preset: str = "quick", seed: int = 0, seeds: int = 1) -> Path:
    """The demo on ``seeds`` seeds, ``seed``, ``seed`` + 1, ...: each a complete demo in OUT/seed-S/ (its
    world, initialization and data order all come from its seed), then OUT/report.md, the phenomena
    table across them, read back from each seed's claims.json. One seed is the demo itself, in OUT. A
    seed folder that holds a finished demo is kept, so a run that was stopped continues where it was."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1 (got {seeds}): the number of seeds to run the demo with")
    if seeds == 1:
        return run_demo(out, gptlab, preset, seed)
    settings = json.loads(json.dumps({"preset": preset, **asdict(demo_preset(preset))}))  # as run.json holds them
    if RunFolder(out).has_record():
        raise UserError(f"{out} holds a gptlab run (its run.json); give the demo with --seeds a new --out")
    folders = {s: out / f"seed-{s}" for s in range(seed, seed + seeds)}
    done = {s: seed_done(folder, settings) for s, folder in folders.items()}  # refuses before any seed runs
    for number, (s, folder) in enumerate(folders.items(), 1):
        if done[s]:
            print(f"== demo: seed {s} ({number} of {seeds}) finished before; kept {folder}", flush=True)
        else:
            print(f"== demo: seed {s} ({number} of {seeds}) -> {folder}", flush=True)
            run_demo(folder, gptlab, preset, s)
    claims_by_seed = {s: read_claims(folder / CLAIMS_FILE) for s, folder in folders.items()}
    report = concatenate(
        [
            Section(
                f"# gptlab demo report: {seeds} seeds\n\nPreset `{preset}`, seeds "
                + ", ".join(f"[{s}](seed-{s}/report.md)" for s in claims_by_seed)
                + ": each a complete demo in `seed-S/` (its world, initialization and data order from its seed) "
                "with its own report."
            ),
            robustness_section(claims_by_seed),
        ]
    )
    write_text_atomic(out / "report.md", report)
    print(report)
    return out / "report.md"


def seed_done(folder: Path, settings: dict) -> bool:
    """Whether ``folder`` holds a finished demo (its report.md and claims.json) of these ``settings`` (the
    config its run.json records); one of other settings is refused rather than mixed with this run's seeds."""
    demo = RunFolder(folder)
    if not (demo.report_path.is_file() and (folder / CLAIMS_FILE).is_file()):
        return False
    if demo.read_record().get("config") != settings:
        raise UserError(
            f"{folder} holds a finished demo of other settings than preset {settings['preset']!r} has now (see its "
            f"run.json); give a new --out, or delete {folder} to run that seed again"
        )
    return True


def measure(world: Path, spec: DemoPreset, runs: dict[str, RunFolder]) -> dict:
    """The demo's models on held-out data: instruction following (base few-shot, SFT zero-shot), the
    reward model's accuracy, DPO and PPO against SFT, arithmetic before and after GRPO, and samples."""
    engines = {name: Engine.from_pretrained(runs[name].model_dir) for name in ("base", "sft", "dpo", "ppo", "grpo")}
    truth = json.loads((world / "world.json").read_text())
    held_out = truth["sft"]["held_out"]
    with warnings_as_lines():
        instruct = instruction_following(world, held_out, engines["base"], engines["sft"], spec.instruct_limit)
    tuned = {"dpo": engines["dpo"], "ppo": engines["ppo"]}
    return {
        "instruct": instruct,
        "samples": [
            (prompt, expected, engines["base"].generate_text(prompt, max_new_tokens=60, temperature=0.0).split("\n")[0])
            for prompt, expected in sample_prompts(world, truth)
        ],
        "conversations": chat_samples(world, held_out, engines["sft"]),
        "preferences": preference_results(world, runs["reward"].model_dir, engines["sft"], tuned),
        "arithmetic": arithmetic_results(world, engines["sft"], engines["grpo"]),
        "base_model": engines["base"].model,
    }


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


def rl_stages(
    gptlab: Command, out: Path, spec: DemoPreset, tuned: RunFolder, reward: RunFolder, seed: int, timings: dict
) -> tuple[RunFolder, RunFolder]:
    """PPO of the SFT model against the reward model on the preference prompts, and GRPO of the SFT
    model on the SFT data's arithmetic questions, rewarded when the stated number is right."""
    world = out / "world"
    ppo_sets = [
        f"reward_model={reward.model_dir}",
        f"data.prompts={world / 'prefs' / 'train.jsonl'}",
        f"max_new_tokens={REPLY_TOKENS}",  # as long as the replies the oracle judges
        "missing_eos_penalty=1.0",
        *spec.ppo_sets,
    ]
    grpo_sets = [
        "reward=arith",
        f"data.prompts={world / 'sft' / 'train.jsonl'}",
        f"data.families={json.dumps(list(ARITH_FAMILIES))}",
        f"max_new_tokens={ARITH_REPLY_TOKENS}",
        *spec.grpo_sets,
    ]
    runs = RunFolder(out / "ppo"), RunFolder(out / "grpo")
    for name, run, sets in (("ppo", runs[0], ppo_sets), ("grpo", runs[1], grpo_sets)):
        sets = [f"init={tuned.model_dir}", f"train.seed={seed}", *sets]
        overrides = sum((["--set", s] for s in sets), [])
        stage(gptlab, name, [name, "--out", str(run.path), "--overwrite", *overrides], timings)
    return runs


def contestants(ladder: Path, runs: dict[str, RunFolder]) -> dict[str, RunFolder]:
    """The arena's models: every size of the ladder (base models, which never saw the chat template),
    then SFT and the models aligned from it."""
    sizes = json.loads((ladder / "ladder.json").read_text())["runs"]
    return {**{r["name"]: run_folder(ladder, r["name"]) for r in sizes}, **{n: runs[n] for n in ARENA_ALIGNED}}


def arena_stage(
    gptlab: Command, out: Path, spec: DemoPreset, models: dict[str, RunFolder], seed: int, timings: dict
) -> Path:
    """`gptlab arena run` among ``models`` on held-out preference prompts of every family, judged by the
    oracle, every pair of models meeting ``spec.arena_rounds`` times; returns the battles' database."""
    folder = out / "arena"
    folder.mkdir(exist_ok=True)
    prompts = arena_prompts(read_jsonl(out / "world" / "prefs" / "test.jsonl"), spec.arena_prompts)
    write_text_atomic(folder / "prompts.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    db = folder / "arena.db"
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)  # the store adds battles to what it holds: a rerun starts a new arena
    battles = spec.arena_rounds * len(models) * (len(models) - 1) // 2
    args = ["arena", "run", "--models", ",".join(f"{name}={run.model_dir}" for name, run in models.items())]
    args += ["--prompts", str(folder / "prompts.jsonl"), "--judge", "oracle", "--world", str(out / "world")]
    args += ["--battles", str(battles), "--db", str(db), "--seed", str(seed), "--max-new-tokens", str(REPLY_TOKENS)]
    stage(gptlab, "arena", args, timings)
    return db


def arena_prompts(pairs: list[dict], limit: int) -> list[list[dict]]:
    """Up to ``limit`` distinct prompts of preference pairs, taken from each family in turn: the families
    the models answer well (word tasks) decide battles, the ones every model gets wrong only tie."""
    by_family: dict[str, dict[str, list[dict]]] = {}
    for pair in pairs:
        by_family.setdefault(pair["family"], {})[json.dumps(pair["prompt"])] = pair["prompt"]
    in_turn = itertools.chain.from_iterable(itertools.zip_longest(*(f.values() for f in by_family.values())))
    return [prompt for prompt in in_turn if prompt is not None][:limit]


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


def preference_results(world: Path, reward_dir: Path, sft: Engine, tuned: dict[str, Engine]) -> dict:
    """The reward model's accuracy on the held-out pairs per kind of rejected answer, and each model
    of ``tuned`` (name -> engine: DPO, PPO) against the SFT model on the held-out prompts."""
    pairs = read_jsonl(world / "prefs" / "test.jsonl")
    scorer = RewardScorer.from_pretrained(reward_dir)
    chosen = scorer.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    correct: dict[str, list[float]] = {}
    for pair, c, r in zip(pairs, chosen, rejected):
        correct.setdefault(pair["kind"], []).append(float(c > r))
    correct["all"] = [v for values in correct.values() for v in values]
    prompts = list({json.dumps(p["prompt"]): p["prompt"] for p in pairs}.values())
    oracle, sft_replies = Oracle(world), chat_replies(sft, prompts, REPLY_TOKENS)
    return {
        "reward_accuracy": {kind: stats.bootstrap_mean_interval(v) for kind, v in correct.items()},
        "reward_n": {kind: len(v) for kind, v in correct.items()},
        **{
            name: against_sft(oracle, prompts, sft_replies, chat_replies(engine, prompts, REPLY_TOKENS))
            for name, engine in tuned.items()
        },
    }


def against_sft(oracle: Oracle, prompts: list[list[dict]], sft_replies: list[str], model_replies: list[str]) -> dict:
    """A model's greedy replies against the SFT model's, judged by the oracle (ties count half): its
    win rate with a 95% interval, the verdicts, both models' oracle score and reply length, and the
    first prompt they answer differently (the first prompt if none)."""
    verdicts = [oracle.judge(p, m, s) for p, m, s in zip(prompts, model_replies, sft_replies)]
    points = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}
    shown = next((i for i, (m, s) in enumerate(zip(model_replies, sft_replies)) if m != s), 0)
    return {
        "win_rate": stats.bootstrap_mean_interval([points[v] for v in verdicts]),
        "verdicts": {v: verdicts.count(v) for v in points},
        "prompts": len(prompts),
        "models": {
            name: {
                "score": sum(oracle.score(p, a) for p, a in zip(prompts, texts)) / len(prompts),
                "words": sum(len(a.split()) for a in texts) / len(prompts),
            }
            for name, texts in (("sft", sft_replies), ("model", model_replies))
        },
        "example": (prompts[shown], sft_replies[shown], model_replies[shown]),
    }


def arithmetic_results(world: Path, sft: Engine, grpo: Engine) -> dict:
    """Exact match of the SFT and GRPO models' greedy replies to the held-out arithmetic questions of
    the SFT test set (``subtract`` is a family SFT never saw), scored by GRPO's own ``arith`` reward:
    1 when the stated number is right. Per model a 95% interval, and the paired GRPO - SFT effect."""
    records = [r for r in read_jsonl(world / "sft" / "test.jsonl") if r.get("family") in ARITH_FAMILIES]
    prompts = [record_prompt(r) for r in records]
    answers = {"sft": chat_replies(sft, prompts, REPLY_TOKENS), "grpo": chat_replies(grpo, prompts, REPLY_TOKENS)}
    exact = {name: [float(v == 1.0) for v in arith(prompts, texts)] for name, texts in answers.items()}
    return {
        "problems": len(prompts),
        "families": sorted({r["family"] for r in records}),
        "exact_match": {name: stats.bootstrap_mean_interval(values) for name, values in exact.items()},
        "effect": stats.difference_interval(exact["sft"], exact["grpo"], paired=True),
        "example": (prompts[0], gold_number(prompts[0]), answers["sft"][0], answers["grpo"][0]),
    }


def arena_results(world: Path, db: Path, seed: int) -> dict:
    """The arena's board, and how well its order agrees with the models' mean oracle score on the
    answers they gave in its battles (Kendall's tau with a bootstrap interval over battles)."""
    with ArenaStore(db, create=False) as store:
        battles = store.battles()
    oracle = Oracle(world)
    scores = [(oracle.score(b.prompt, b.answer_a), oracle.score(b.prompt, b.answer_b)) for b in battles]
    return {
        "board": Board(battles, seed=seed),
        "agreement": rank_agreement(battles, scores, seed=seed),
        "scores": mean_scores(battles, scores),
        "prompts": len({json.dumps(b.prompt) for b in battles}),
        "verdicts": {v: sum(b.winner == v for b in battles) for v in WINNERS},
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


def alignment_claims(instruct: dict, preferences: dict, arena: dict) -> list[Claim]:
    """The phenomena table's rows after the ladder's, in the lecture's order: instruction tuning,
    RLHF (PPO), DPO and the arena as measured here."""
    claim = Claim(
        INSTRUCTION_TUNING,
        f"SFT model zero-shot minus the base model {INSTRUCT_SHOTS}-shot, accuracy on held-out instruction families "
        "(oracle-scored)",
    )
    held = instruct["groups"].get("held-out families")
    if held:
        claim.effect, claim.lo, claim.hi = held["effect"]
        if claim.lo <= 0:
            claim.note = "if no: a larger base model or more SFT steps"
    dpo = win_rate_claim(
        DPO,
        "DPO",
        preferences["dpo"],
        "a model that knows more facts, not more DPO steps (docs/alignment.md)",
    )
    ppo = win_rate_claim(
        RLHF,
        "PPO",
        preferences["ppo"],
        f"the reward model it climbs ranks a right answer above a wrong one in only "
        f"{preferences['reward_accuracy']['wrong'][0]:.0%} of held-out pairs: it rewards style more than facts "
        "(docs/alignment.md)",
    )
    return [claim, ppo, dpo, arena_claim(arena)]


def arena_claim(arena: dict) -> Claim:
    """Reproduced when the arena's order agrees with the oracle's scores beyond chance: the interval of
    Kendall's tau lies above zero."""
    tau, (lo, hi) = arena["agreement"]["tau"], arena["agreement"]["ci"]
    measure = (
        "Kendall's tau between the arena's order (Bradley-Terry over oracle-judged battles) and the models' mean "
        "oracle score"
    )
    if not math.isfinite(tau):
        return Claim(ARENA, measure, note=UNDECIDED_ARENA)
    claim = Claim(ARENA, measure, tau, lo, hi, unit="tau")
    if lo <= 0:
        claim.note = "if no: more prompts or battles per pair (arena_prompts, arena_rounds)"
    return claim


def win_rate_claim(claim: str, model: str, comparison: dict, if_not: str) -> Claim:
    """A claim measured by a model's oracle-judged win rate against the SFT model (``against_sft``):
    reproduced when its interval lies above 50%; if not, the note says how many prompts both models
    answer wrong (where neither can win) and ``if_not``."""
    win, lo, hi = comparison["win_rate"]
    measure = (
        f"{model}'s win rate against the SFT model minus 50%, held-out prompts (the oracle, TinyWorld's hidden "
        "human preference, judges; ties half)"
    )
    result = Claim(claim, measure, win - 0.5, lo - 0.5, hi - 0.5)
    if lo <= 0.5:
        both_wrong = comparison["verdicts"]["tie (bothbad)"] / comparison["prompts"]
        result.note = (
            f"if no: both replies are wrong on {both_wrong:.0%} of prompts, and {model} wins only where it fixes a "
            f"wrong SFT answer: {if_not}"
        )
    return result


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
                *comparison_lines("DPO", result["dpo"]),
                "",
                "A longer DPO reply at an equal or lower score is DPO's known length exploitation.",
            ]
        )
    )


def comparison_lines(model: str, comparison: dict) -> list[str]:
    """A model against the SFT model (``against_sft``): the win rate, the verdicts, both models'
    oracle score and reply length, and one prompt they answer differently."""
    mean, lo, hi = comparison["win_rate"]
    sft, tuned = comparison["models"]["sft"], comparison["models"]["model"]
    prompt, sft_reply, model_reply = comparison["example"]
    return [
        (
            f"{model} against SFT on {comparison['prompts']} held-out prompts (greedy replies, judged by the "
            f"oracle; ties count half): {model} wins **{mean * 100:.1f}%** [{lo * 100:.1f}, {hi * 100:.1f}]."
        ),
        "",
        f"| {model} better | tie | SFT better | both wrong (tie) |",
        "|---|---|---|---|",
        "| {model_a} | {tie} | {model_b} | {tie (bothbad)} |".format_map(comparison["verdicts"]),
        "",
        "| model | oracle score | mean reply length (words) |",
        "|---|---|---|",
        f"| SFT | {sft['score']:.3f} | {sft['words']:.1f} |",
        f"| {model} | {tuned['score']:.3f} | {tuned['words']:.1f} |",
        "",
        f"| user | SFT | {model} |",
        "|---|---|---|",
        f"| {cell(prompt[-1]['content'])} | {cell(sft_reply)} | {cell(model_reply)} |",
    ]


def rl_section(ppo: RunFolder, grpo: RunFolder, comparison: dict, arithmetic: dict, plot: Path) -> Section:
    """PPO (its reward and KL curves, written to ``plot``, and its win rate against SFT) and GRPO (held-out
    arithmetic before and after), each with [rl]'s target, recorded and not asserted."""
    return Section(
        "\n".join(
            [
                "## RL from feedback: PPO and GRPO",
                "",
                *ppo_lines(ppo, comparison, plot),
                "",
                *grpo_lines(grpo, arithmetic),
            ]
        ),
        [plot],
    )


def ppo_lines(run: RunFolder, comparison: dict, plot: Path) -> list[str]:
    """The PPO run (its config, metrics and curves) and the PPO model against SFT (``against_sft``)."""
    metrics, config = run.read_metrics(), run.read_record()["config"]
    train = config["train"]
    plot_rl_curves(metrics, plot, ("objective/scores", "objective/kl"), "PPO against the demo's reward model")
    kl = [m["objective/kl"] for m in metrics if "objective/kl" in m]
    mean_kl = sum(kl) / len(kl)
    win, lo, _ = comparison["win_rate"]
    met = win >= 0.6 and lo > 0.5 and mean_kl < 10
    return [
        (
            f"PPO starts from the SFT model, answers the prompts of `prefs/train.jsonl` (temperature "
            f"{config['temperature']}) and is scored by the reward model above, with a KL penalty to the SFT model "
            f"(kl_coef {config['kl_coef']}): {train['max_steps']} steps of {train['batch_size']} answers, "
            f"{config['ppo_epochs']} passes over each rollout. Per rollout: objective/scores (the reward model's "
            f"score, less {config['missing_eos_penalty']} for an answer that never ends) and objective/kl (KL to the "
            "SFT model, summed over an answer's tokens)."
        ),
        "",
        "| metric | value |",
        "|---|---|",
        *first_to_last_rows(metrics, [row for row in PPO_ROWS if row[0] in PPO_DEMO_ROWS]),
        f"| objective/kl, mean over the rollouts | {mean_kl:.3f} |",
        "",
        f"![PPO reward and KL]({plot.name})",
        "",
        *comparison_lines("PPO", comparison),
        "",
        (
            f"[rl]'s target (recorded, not asserted): PPO wins >= 60% with the interval above 50% and mean KL below "
            f"10 nats: **{'met' if met else 'not met'}** ({win * 100:.1f}%, lower bound {lo * 100:.1f}%, mean KL "
            f"{mean_kl:.2f})."
        ),
    ]


def grpo_lines(run: RunFolder, arithmetic: dict) -> list[str]:
    """The GRPO run (its config and metrics) and held-out arithmetic before and after (``arithmetic_results``)."""
    metrics, config = run.read_metrics(), run.read_record()["config"]
    steps, answers, generations = config["train"]["max_steps"], config["train"]["batch_size"], config["num_generations"]
    equal = [m["frac_reward_zero_std"] for m in metrics if "frac_reward_zero_std" in m]
    no_signal = sum(equal) / len(equal)
    prompt, gold, sft_reply, grpo_reply = arithmetic["example"]
    effect = arithmetic["effect"]
    return [
        (
            f"GRPO starts from the SFT model, answers the arithmetic questions of `sft/train.jsonl` (temperature "
            f"{config['temperature']}) and is rewarded 1 when the stated number is right (`reward=arith`): {steps} "
            f"steps of {answers // generations} questions x {generations} answers. Held out: the "
            f"{arithmetic['problems']} arithmetic questions of `sft/test.jsonl` ({', '.join(arithmetic['families'])}), "
            "greedy replies, exact match of the stated number (the same `arith` reward), 95% bootstrap intervals."
        ),
        "",
        "| model | exact match, % [95% CI] |",
        "|---|---|",
        *(
            f"| {name} | {mean * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}] |"
            for name, (mean, lo, hi) in (
                ("SFT", arithmetic["exact_match"]["sft"]),
                ("GRPO", arithmetic["exact_match"]["grpo"]),
            )
        ),
        f"| GRPO - SFT (paired, points) | {format_points(effect)} |",
        "",
        "| metric | value |",
        "|---|---|",
        *first_to_last_rows(metrics, [row for row in GRPO_ROWS if row[0] in GRPO_DEMO_ROWS]),
        f"| frac_reward_zero_std (groups of equal rewards: no gradient), mean over the run | {no_signal:.1%} |",
        "",
        "| user | right answer | SFT | GRPO |",
        "|---|---|---|---|",
        f"| {cell(prompt[-1]['content'])} | {gold} | {cell(sft_reply)} | {cell(grpo_reply)} |",
        "",
        (
            "[rl]'s target (recorded, not asserted): GRPO raises held-out exact match with an interval that excludes "
            f"zero: **{'met' if effect[1] > 0 else 'not met'}**."
        ),
    ]


def arena_section(result: dict, plot: Path) -> Section:
    """The arena's board (``arena_results``) with its plot, the verdicts, and the rank agreement with the
    oracle's mean scores."""
    board = result["board"]
    board.plot(plot)
    return Section(
        "\n".join(
            [
                "## Arena",
                "",
                f"Every model answers the same {result['prompts']} held-out preference prompts (greedy); each pair "
                "meets on prompts dealt at random, sides random, and TinyWorld's oracle judges (`gptlab arena run "
                "--judge oracle`; the battles are in `arena/arena.db`: `gptlab arena board --db arena/arena.db`).",
                "",
                "| A better | B better | tie | both wrong (tie) |",
                "|---|---|---|---|",
                "| {model_a} | {model_b} | {tie} | {tie (bothbad)} |".format_map(result["verdicts"]),
                "",
                board.markdown(),
                f"![arena]({plot.name})",
                "",
                "| model | mean oracle score of its answers |",
                "|---|---|",
                *(f"| {row['model']} | {result['scores'][row['model']]:.3f} |" for row in board.rows),
                "",
                agreement_line(result["agreement"]),
            ]
        ),
        [plot],
    )


def agreement_line(agreement: dict) -> str:
    """The report's sentence on Kendall's tau between the arena's order and the oracle's (``rank_agreement``)."""
    tau, (lo, hi) = agreement["tau"], agreement["ci"]
    if not math.isfinite(tau):
        return f"Kendall's tau between the arena's order and the oracle's is undefined: {UNDECIDED_ARENA}."
    return (
        "Kendall's tau between the arena's order (Bradley-Terry) and the order of the mean oracle scores: "
        f"**{tau:.2f}** [{lo:.2f}, {hi:.2f}] (95% bootstrap interval over battles, {agreement['rounds']} rounds)."
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
