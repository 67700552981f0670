"""Reports: each stage's part of a report is a ``Section`` (its markdown and the plots it wrote),
and a report is sections in pipeline order. ``gptlab report`` writes a run folder's report.md for
the kind of run its run.json records: a training run's card (pretrain, SFT, reward, DPO, PPO, GRPO), a ladder's scaling
report with its phenomena table, or, for a demo's folder, one for each run inside it.

Every claim of the lecture is stated, measured on the ladder's own samples with a seeded 95%
bootstrap interval, and marked reproduced only when the interval excludes zero in the claimed
direction. A claim the ladder cannot measure says so; one that did not appear is reported as not
appearing, with what would be needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gptlab import stats
from gptlab.data.documents import jsonl_records
from gptlab.errors import UserError
from gptlab.fileio import read_text, write_json_atomic, write_text_atomic
from gptlab.runs import RunFolder

# What the report reads of each run in ladder.json, and of each record of its samples.jsonl.
LADDER_RUN_FIELDS = {
    "name": str,
    "params": int,
    "tokens": int,
    "flops": (int, float),
    "val_loss": (int, float),
    "train_seconds": (int, float),
    "metrics": dict,
}
LADDER_KIND_NAMES = {str: "a string", int: "a whole number", (int, float): "a number", dict: "an object"}
SAMPLE_FIELDS = ("task", "setting", "doc_id", "correct")


@dataclass
class Section:
    """One stage's part of a report: its markdown, the plots it wrote (which the markdown links) and
    the claims it measured (the phenomena table's rows, which the demo also writes to claims.json)."""

    markdown: str
    plots: list[Path] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)


def concatenate(sections: list[Section]) -> str:
    """A report of ``sections`` in the order given, a blank line between two."""
    return "\n\n".join(section.markdown for section in sections) + "\n"


def format_points(interval: tuple[float, float, float]) -> str:
    """An accuracy effect with its interval, (effect, lo, hi) as fractions, in signed points."""
    effect, lo, hi = (value * 100 for value in interval)
    return f"{effect:+.1f} [{lo:+.1f}, {hi:+.1f}]"


@dataclass
class Claim:
    claim: str
    measure: str
    effect: float | None = None
    lo: float | None = None
    hi: float | None = None
    note: str = ""
    unit: str = "points"  # "points": accuracy differences shown x100; "exponent", "tau": as is

    @property
    def reproduced(self) -> bool | None:
        return None if self.lo is None else self.lo > 0

    def row(self) -> str:
        if self.effect is None:
            measured, verdict = "not measured yet", "—"
        else:
            measured = format_effect((self.effect, self.lo, self.hi), self.unit)
            verdict = "yes" if self.reproduced else "no"
        return f"| {self.claim} | {self.measure} | {measured} | {verdict} | {self.note} |"


def format_effect(interval: tuple[float, float, float], unit: str) -> str:
    """(effect, lo, hi) in a claim's unit: accuracy differences in signed points, others as they are."""
    if unit == "points":
        return format_points(interval)
    effect, lo, hi = interval
    return f"{effect:.3f} [{lo:.3f}, {hi:.3f}]"


# ---------------------------------------------------------------------------------------------
# Per-item scores


class Samples:
    """Per-item scores of every run, keyed by (run name, task, setting) -> {item: score}."""

    def __init__(self, ladder_dir: Path, runs: list[dict]):
        self.scores: dict[tuple[str, str, str, str], dict] = {}
        for run in runs:
            path = ladder_dir / "runs" / run["name"] / "samples.jsonl"
            for number, s in jsonl_records(path):
                missing = [key for key in SAMPLE_FIELDS if key not in s]
                if missing:
                    raise UserError(
                        f"{path}:{number} is not a sample record (no {', '.join(missing)}); re-run the ladder's "
                        "evaluation: remove that run's folder and run `gptlab ladder` again"
                    )
                item = (s.get("subject"), s["doc_id"])
                key = (run["name"], s["task"], s["setting"])
                self.scores.setdefault(key + ("correct",), {})[item] = float(s["correct"])
                if "partial_credit" in s.get("scores", {}):
                    self.scores.setdefault(key + ("partial_credit",), {})[item] = s["scores"]["partial_credit"]

    def vector(self, run: str, tasks: list[str], setting: str, metric: str = "correct") -> tuple[list, np.ndarray]:
        """(items, scores) pooled over tasks, in a fixed item order so two vectors pair up."""
        items, values = [], []
        for task in tasks:
            scores = self.scores.get((run, task, setting, metric), {})
            for item in sorted(scores, key=str):
                items.append((task, item))
                values.append(scores[item])
        return items, np.asarray(values)

    def paired(self, *keys: tuple, tasks: list[str], metric: str = "correct") -> list[np.ndarray]:
        """One score vector per (run, setting), over the items every one of them answered, in one order."""
        vectors = [dict(zip(*self.vector(run, tasks, setting, metric))) for run, setting in keys]
        common = sorted(set.intersection(*(set(v) for v in vectors)), key=str)
        return [np.asarray([v[item] for item in common]) for v in vectors]


def _difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float] | None:
    return stats.difference_interval(a, b, paired=True) if a.size else None


def _gain_growth(samples: Samples, small: str, large: str, tasks: list[str], base: str, better: str):
    """(gain of the large model) - (gain of the small one), paired over the items all four answered."""
    s_base, s_better, l_base, l_better = samples.paired(
        (small, base), (small, better), (large, base), (large, better), tasks=tasks
    )
    return _difference(s_better - s_base, l_better - l_base)


def _shots(setting: str) -> int:
    return int(setting.split("-")[0])


def _abilities(metrics: dict) -> tuple[list[str], list[str], list[str]]:
    """The arithmetic tasks, the word tasks and the word tasks' settings (fewest shots first) of
    one run's metrics."""
    arith = sorted(t for t in metrics if t.startswith("arith_"))
    words = sorted(t for t in metrics if t.startswith("words_"))
    word_settings = sorted(metrics[words[0]], key=_shots) if words else []
    return arith, words, word_settings


# ---------------------------------------------------------------------------------------------
# Claims


# The claims' words, shared with the demo, which measures the later stages' claims.
INSTRUCTION_TUNING = "Instruction tuning improves zero-shot performance on unseen tasks"
RLHF = "People prefer the RLHF model's answers to the SFT model's (reward model + PPO)"
DPO = "People prefer the DPO model's answers to the SFT model's"
ARENA = "Pairwise votes in an arena rank models as people would (Chatbot Arena)"
MMLU = ["world_mmlu"]


def ladder_claims(ladder: dict, samples: Samples, extra: list[Claim] = ()) -> list[Claim]:
    """The phenomena the ladder can measure, in the lecture's order, then ``extra`` (later stages')."""
    runs = ladder["runs"]
    small, large = runs[0], runs[-1]
    metrics = large["metrics"]
    arith, words, word_settings = _abilities(metrics)
    claims = [_next_token_claim(large), _loss_claim(ladder["fit"])]
    if words:
        claims += _word_scale_claims(samples, runs, words, word_settings[-1])
    if arith:
        claims.append(
            _claim(
                "Arithmetic emerges with scale (exact match)",
                f"arithmetic exact match, standard prompting, {_sized(large)} minus {_sized(small)}",
                samples.paired((small["name"], "standard"), (large["name"], "standard"), tasks=arith),
                "if no: arithmetic needs more compute per model than this ladder spends (docs/tinyworld.md)",
            )
        )
    if "world_mmlu" in metrics:
        claims += _mmlu_claims(samples, small, large)
    if words and _shots(word_settings[-1]) > 0:
        claims += _few_shot_claims(samples, small["name"], large["name"], words, word_settings[-1])
    if arith:
        claims += _cot_claims(samples, small["name"], large["name"], arith)
    return claims + list(extra)


def _sized(run: dict) -> str:
    """A run's name with its size and training compute, as a claim about scale names them."""
    return f"{run['name']} ({run['params'] / 1e6:.2f}M params, {run['flops']:.1e} FLOPs)"


def _next_token_claim(run: dict) -> Claim:
    """Pretraining's loss is on every position, and it falls: the val loss of each window before
    and after training, paired, from what the ladder recorded (``ladder.next_token_losses``)."""
    claim = Claim(
        "Pretraining is next-token prediction on every token, and the loss falls",
        f"{run['name']}: val loss per window before minus after pretraining (nats/token)",
        unit="nats",
    )
    measured = run.get("next_token")
    if not measured:
        claim.note = "not recorded by this ladder (its runs predate the measure): run them again"
        return claim
    claim.effect, claim.lo, claim.hi = stats.difference_interval(
        measured["trained"], measured["untrained"], paired=True
    )
    share = measured["with_loss"] / measured["positions"]
    claim.note = (
        f"a loss on {share:.1%} of the {measured['positions']:,} positions of {len(measured['trained'])} val windows; "
        f"{np.mean(measured['untrained']):.2f} → {np.mean(measured['trained']):.2f}"
    )
    return claim


def _loss_claim(fit: dict) -> Claim:
    power = fit["power_law"]
    claim = Claim(
        "Loss falls smoothly as a power law of compute (scaling laws)",
        "exponent α of L(C) = a·C^-α + L∞",
        unit="exponent",
    )
    if "alpha" in power and power.get("intervals"):
        claim.effect = power["alpha"]
        claim.lo, claim.hi = power["intervals"]["alpha"]
        claim.note = "monotone over the ladder" if fit["monotone"] else "NOT monotone over the ladder"
    else:
        claim.note = power.get("unsupported") or "a fit with an interval needs at least 4 sizes"
        if "alpha" in power:
            claim.note += f" (exact fit: α = {power['alpha']:.3f})"
    return claim


def _word_scale_claims(samples: Samples, runs: list[dict], words: list[str], k: str) -> list[Claim]:
    small, large = runs[0], runs[-1]
    claims = [
        _claim(
            "Abilities emerge with scale: size and compute (exact match)",
            f"word tasks {k}, exact match, {_sized(large)} minus {_sized(small)}",
            samples.paired((small["name"], k), (large["name"], k), tasks=words),
            "if no: the largest model is still below the task's threshold; a longer ladder or more compute",
        )
    ]
    if len(runs) >= 2:
        claims.append(_metric_claim(samples, runs, words, k))
    return claims


def _metric_claim(samples: Samples, runs: list[dict], words: list[str], k: str) -> Claim:
    """Partial credit over the sizes before exact match first leaves the smallest model's: if it
    has already risen by the last of them, the all-or-nothing metric hid a gradual gain."""
    small = runs[0]["name"]
    before = before_em = None
    for run in runs[1:]:
        em = _difference(*samples.paired((small, k), (run["name"], k), tasks=words))
        if em is None or em[1] > 0:
            break
        before, before_em = run["name"], em
    claim = Claim(
        "Emergence is partly the metric: partial credit rises before exact match (Schaeffer et al.)",
        f"word tasks {k}, partial credit (1 - edit distance), {before or runs[1]['name']} minus {small}: "
        "the largest size whose exact match has not moved",
    )
    if before is None:
        claim.note = "exact match already moves at the second size: a ladder with finer steps is needed"
        return claim
    partial = _difference(*samples.paired((small, k), (before, k), tasks=words, metric="partial_credit"))
    if partial:
        claim.effect, claim.lo, claim.hi = partial
        claim.note = f"exact match over the same step: {format_points(before_em)}"
    return claim


def _few_shot_claims(samples: Samples, small: str, large: str, words: list[str], k: str) -> list[Claim]:
    return [
        _claim(
            "In-context learning: few-shot prompting beats zero-shot",
            f"word tasks, {k} minus 0-shot accuracy, {large}",
            samples.paired((large, "0-shot"), (large, k), tasks=words),
            "if no: more word-task episodes (mixture.words)",
        ),
        _claim(
            "Larger models gain more from examples in the prompt",
            f"word tasks, ({k} - 0-shot) of {large} minus that of {small}",
            _gain_growth(samples, small, large, words, "0-shot", k),
            "if no: a wider ladder",
        ),
    ]


def _mmlu_claims(samples: Samples, small: dict, large: dict) -> list[Claim]:
    """MMLU-format accuracy by size, and its few-shot gain by size, at the most shots the ladder
    asked. A claim whose requests were cut to fit the window is not measured: its prompts lost their
    first examples."""
    settings = sorted(large["metrics"]["world_mmlu"], key=_shots)
    k, a, b = settings[-1], small["name"], large["name"]
    claims = [
        (
            _claim(
                "MMLU-format accuracy rises with size",
                f"world_mmlu {k} accuracy, {_sized(large)} minus {_sized(small)}",
                samples.paired((a, k), (b, k), tasks=MMLU),
                "if no: the held-out people's facts are in their biographies only; recalling them takes more "
                "parameters and tokens than this ladder has (docs/tinyworld.md)",
            ),
            [k],
        )
    ]
    if _shots(k) > 0 and "0-shot" in settings:
        claims += [
            (
                _claim(
                    "Few-shot prompting beats zero-shot on MMLU format",
                    f"world_mmlu {k} minus 0-shot accuracy, {b}",
                    samples.paired((b, "0-shot"), (b, k), tasks=MMLU),
                    "if no: the examples teach only the answer format, which the corpus's multiple-choice blocks "
                    "already taught",
                ),
                ["0-shot", k],
            ),
            (
                _claim(
                    "The MMLU few-shot gain grows with size",
                    f"world_mmlu ({k} - 0-shot) of {b} minus that of {a}",
                    _gain_growth(samples, a, b, MMLU, "0-shot", k),
                    "if no: a wider ladder",
                ),
                ["0-shot", k],
            ),
        ]
    for claim, used in claims:
        cut = sum(run["metrics"]["world_mmlu"][s].get("truncated", 0) for run in (small, large) for s in used)
        if cut:
            claim.effect = claim.lo = claim.hi = None
            claim.note = (
                f"prompts cut: {cut:,} of its scoring requests ({a} and {b}, one per choice) were longer than the "
                "models' window and lost their first tokens (lm-eval's rule); fewer eval.mmlu_shots or a longer "
                "sizes.block_size and train.seq_len (docs/scaling.md)"
            )
    return [claim for claim, _ in claims]


def _cot_claims(samples: Samples, small: str, large: str, arith: list[str]) -> list[Claim]:
    return [
        _claim(
            "Chain-of-thought prompting beats standard prompting",
            f"arithmetic exact match, step-by-step minus standard prompting, {large}",
            samples.paired((large, "standard"), (large, "cot"), tasks=arith),
            "if no: CoT needs models trained past the worked-solution format; more compute per model",
        ),
        _claim(
            "The chain-of-thought gain grows with size",
            f"(CoT - standard) of {large} minus that of {small}",
            _gain_growth(samples, small, large, arith, "standard", "cot"),
            "if no: a wider ladder",
        ),
    ]


def _claim(claim: str, measure: str, pair, if_not: str) -> Claim:
    result = Claim(claim, measure)
    if isinstance(pair, list):  # two paired score vectors, not yet an effect
        pair = _difference(*pair)
    if pair is None:
        result.note = "no items to compare"
        return result
    result.effect, result.lo, result.hi = pair
    if result.lo <= 0:
        result.note = if_not
    return result


NOT_YET = [
    Claim(
        INSTRUCTION_TUNING,
        "SFT zero-shot minus base few-shot, held-out families",
        note="measured by `gptlab demo` (SFT stage)",
    ),
    Claim(RLHF, "PPO's oracle win rate vs the SFT model", note="measured by `gptlab demo` (PPO stage)"),
    Claim(DPO, "DPO's oracle win rate vs the SFT model", note="measured by `gptlab demo` (DPO stage)"),
    Claim(
        ARENA,
        "Kendall's tau: arena order (oracle-judged battles) vs mean oracle score",
        note="measured by `gptlab demo` (arena stage)",
    ),
]


# ---------------------------------------------------------------------------------------------
# Claims across seeds (`gptlab demo --seeds N`)

CLAIMS_FILE = "claims.json"  # a demo folder's phenomena table rows, which the table across seeds reads


def write_claims(path: Path, claims: Sequence[Claim]) -> None:
    """The claims as a JSON list of their fields, written atomically (a reader never sees half of it)."""
    write_json_atomic(path, [asdict(claim) for claim in claims])


def read_claims(path: Path) -> list[Claim]:
    """The claims ``write_claims`` wrote; one error line when the file holds anything else."""
    try:
        return [Claim(**record) for record in json.loads(read_text(path))]
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(
            f"{path} is not a list of a demo's claims ({e}); delete it and run the demo again to measure that seed "
            "again"
        ) from None


def seeds_needed(seeds: int) -> int:
    """On how many of ``seeds`` seeds a claim must reproduce to be called reproduced: two thirds, rounded up."""
    return -(-2 * seeds // 3)


@dataclass
class ClaimAcrossSeeds:
    """One claim of the phenomena table as each seed of a ``--seeds`` demo measured it (``by_seed``:
    seed -> that seed's claim; a seed that did not measure it is missing or has no effect)."""

    claim: str
    seeds: list[int]
    by_seed: dict[int, Claim]

    @property
    def measured(self) -> dict[int, Claim]:
        """The seeds with an effect and a finite interval (an arena's tau is NaN when every model ties)."""
        return {
            seed: c for seed, c in self.by_seed.items() if c.effect is not None and np.all(np.isfinite(_interval(c)))
        }

    @property
    def reproduced_on(self) -> int:
        return sum(bool(c.reproduced) for c in self.measured.values())

    @property
    def pooled(self) -> tuple[float, float, float] | None:
        """The seeds' effects pooled (``stats.pooled_interval``) over the seeds that measured the claim."""
        measured = self.measured.values()
        return stats.pooled_interval([(c.effect, c.lo, c.hi) for c in measured]) if measured else None

    @property
    def reproduced(self) -> bool | None:
        """Yes when the pooled interval excludes zero in the claimed direction and the claim reproduced
        on ``seeds_needed`` of the seeds run; None when no seed measured it."""
        pooled = self.pooled
        if pooled is None:
            return None
        return pooled[1] > 0 and self.reproduced_on >= seeds_needed(len(self.seeds))

    def row(self) -> str:
        unit = next(iter(self.by_seed.values())).unit
        measured = self.measured
        per_seed = "<br>".join(
            f"seed {seed}: " + (format_effect(_interval(measured[seed]), unit) if seed in measured else "not measured")
            for seed in self.seeds
        )
        if self.pooled is None:
            pooled, verdict = "not measured", "—"
        else:
            pooled, verdict = format_effect(self.pooled, unit), "yes" if self.reproduced else "no"
            missing = [str(seed) for seed in self.seeds if seed not in measured]
            if missing:
                pooled += f" (over seeds {', '.join(map(str, measured))}; not measured on {', '.join(missing)})"
        return f"| {self.claim} | {per_seed} | {self.reproduced_on} of {len(self.seeds)} | {pooled} | {verdict} |"


def _interval(claim: Claim) -> tuple[float, float, float]:
    return claim.effect, claim.lo, claim.hi


def claims_across_seeds(claims_by_seed: dict[int, list[Claim]]) -> list[ClaimAcrossSeeds]:
    """Each claim any seed measured, in the order the seeds' tables first list them."""
    seeds = list(claims_by_seed)
    across: dict[str, ClaimAcrossSeeds] = {}
    for seed, claims in claims_by_seed.items():
        for claim in claims:
            across.setdefault(claim.claim, ClaimAcrossSeeds(claim.claim, seeds, {})).by_seed[seed] = claim
    return list(across.values())


def robustness_section(claims_by_seed: dict[int, list[Claim]], heading: str = "##") -> Section:
    """The phenomena table across seeds: per claim, each seed's effect, on how many seeds it reproduced,
    the pooled effect and the verdict (``ClaimAcrossSeeds.reproduced``)."""
    rows = claims_across_seeds(claims_by_seed)
    n = len(claims_by_seed)
    held = sum(bool(row.reproduced) for row in rows)
    unmeasured = sum(row.reproduced is None for row in rows)
    lines = [
        f"{heading} Claims across seeds",
        "",
        (
            "Each seed's effect with its 95% bootstrap interval, as that seed's own report gives it; a claim "
            "reproduces on a seed when that interval excludes zero in the claimed direction. Pooled: a fixed-effect "
            "inverse-variance mean of the seeds' effects, each seed's standard error read off its interval as "
            "(hi - lo) / (2 × 1.96), over the seeds that measured the claim. Reproduced = the pooled interval "
            f"excludes zero in the claimed direction and the claim reproduced on at least {seeds_needed(n)} of the "
            f"{n} seeds."
        ),
        "",
        "| claim | per seed: effect [95% CI] | seeds reproduced | pooled effect [95% CI] | reproduced |",
        "|---|---|---|---|---|",
        *(row.row() for row in rows),
        "",
        f"Reproduced across seeds: **{held} of {len(rows)}** claims"
        + (f" ({unmeasured} measured on no seed)." if unmeasured else "."),
    ]
    return Section("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Plots


def pyplot():
    """matplotlib's pyplot on the Agg backend: the report's (and the arena board's) plots are files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, then closed (a report draws many figures)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _save_line_plot(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size=None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    save_figure(plt, fig, path)


def plot_pretraining_loss(metrics: list[dict], path: Path, title: str = "Pretraining on TinyWorld") -> None:
    plt = pyplot()
    logged = [m for m in metrics if "loss" in m]
    train = [(m["tokens"], m["loss"]) for m in logged]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    tokens_per_step = logged[-1]["tokens"] / logged[-1]["step"]  # the last record may be evaluation only
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot([s * tokens_per_step for s, _ in val], [v for _, v in val], "o-", label="val loss")
    _save_line_plot(plt, fig, ax, path, "tokens", "cross-entropy (nats/token)", title)


def plot_dpo_rewards(metrics: list[dict], path: Path, title: str) -> None:
    """rewards/margins and rewards/accuracies over the steps, on the training pairs and the held-out ones."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("rewards/margins", "rewards/accuracies")):
        for key, style, label in ((name, "-", "training pairs"), (f"eval_{name}", "o-", "held-out pairs")):
            points = [(m["step"], m[key]) for m in metrics if key in m]
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(plt, fig, path)


def plot_rl_curves(metrics: list[dict], path: Path, names: Sequence[str], title: str) -> None:
    """One panel per metric (those logged) over the steps: an RL run's reward and KL curves."""
    plt = pyplot()
    shown = [name for name in names if any(name in m for m in metrics)]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.5), squeeze=False)
    for ax, name in zip(axes[0], shown):
        ax.plot(*zip(*[(m["step"], m[name]) for m in metrics if name in m]), "-")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(plt, fig, path)


def plot_loss(ladder: dict, path: Path) -> None:
    plt = pyplot()
    runs = ladder["runs"]
    compute = np.array([r["flops"] for r in runs])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(compute, [r["val_loss"] for r in runs], "o", label="val loss")
    for r in runs:
        ax.annotate(
            f"{r['name']} ({r['params'] / 1e6:.2f}M)",
            (r["flops"], r["val_loss"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    fit = ladder["fit"]["power_law"]
    if "alpha" in fit:
        grid = np.geomspace(compute.min() / 1.5, compute.max() * 1.5, 100)
        ax.plot(
            grid,
            fit["a"] * grid ** (-fit["alpha"]) + fit["l_inf"],
            "--",
            label=f"fit: {fit['a']:.3g}·C^-{fit['alpha']:.3f} + {fit['l_inf']:.2f}",
        )
    ax.set_xscale("log")
    _save_line_plot(plt, fig, ax, path, "training compute (FLOPs)", "val loss (nats/token)", "Loss vs compute", 8)


def plot_emergence(ladder: dict, samples: Samples, path: Path) -> None:
    """Each ability against compute under exact match (left) and partial credit (right)."""
    plt = pyplot()
    runs = ladder["runs"]
    compute = [r["flops"] for r in runs]
    metrics = runs[-1]["metrics"]
    series = [(t.removeprefix("arith_"), t, "standard") for t in sorted(metrics) if t.startswith("arith_")]
    for task in sorted(t for t in metrics if t.startswith("words_")):
        k = max(metrics[task], key=lambda s: int(s.split("-")[0]))
        series.append((f"{task.removeprefix('words_')} ({k})", task, k))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, metric, title in ((axes[0], "correct", "exact match"), (axes[1], "partial_credit", "partial credit")):
        for label, task, setting in series:
            means = [samples.vector(r["name"], [task], setting, metric)[1].mean() for r in runs]
            ax.plot(compute, means, "o-" if task.startswith("words_") else "s--", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_title(f"Abilities vs compute, {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[1].legend(fontsize=7)
    save_figure(plt, fig, path)


def plot_fewshot(ladder: dict, samples: Samples, path: Path) -> None:
    plt = pyplot()
    runs = ladder["runs"]
    words = sorted(t for t in runs[-1]["metrics"] if t.startswith("words_"))
    ks = sorted(int(s.split("-")[0]) for s in runs[-1]["metrics"][words[0]])
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot(
            ks,
            [samples.vector(r["name"], words, f"{k}-shot")[1].mean() for k in ks],
            "o-",
            label=f"{r['name']} ({r['params'] / 1e6:.2f}M)",
        )
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks, [str(k) for k in ks])
    _save_line_plot(
        plt,
        fig,
        ax,
        path,
        "examples in the prompt (k)",
        "accuracy, word tasks pooled",
        "In-context learning vs model size",
        8,
    )


def plot_cot(ladder: dict, samples: Samples, path: Path) -> None:
    plt = pyplot()
    runs = ladder["runs"]
    tasks = sorted(t for t in runs[-1]["metrics"] if t.startswith("arith_"))
    effects = [
        _difference(*samples.paired((r["name"], "standard"), (r["name"], "cot"), tasks=tasks)) or (np.nan,) * 3
        for r in runs
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(runs))
    mean = np.array([e[0] for e in effects]) * 100
    err = np.array([[e[0] - e[1], e[2] - e[0]] for e in effects]).T * 100
    ax.bar(x, mean, yerr=err, capsize=4)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [f"{r['name']}\n{r['params'] / 1e6:.2f}M" for r in runs])
    ax.set_ylabel("CoT minus standard (points, 95% CI)")
    ax.set_title("Chain-of-thought gain vs model size")
    ax.grid(alpha=0.3, axis="y")
    save_figure(plt, fig, path)


def plot_ladder(ladder_dir: Path, ladder: dict, samples: Samples) -> dict[str, Path]:
    """Write the ladder's plots into ``ladder_dir``: {caption: path}, in the report's order."""
    arith, words, _ = _abilities(ladder["runs"][-1]["metrics"])
    plots = {"loss vs compute": ladder_dir / "loss_vs_compute.png"}
    plot_loss(ladder, plots["loss vs compute"])
    if arith:
        plots["emergence"], plots["cot"] = ladder_dir / "emergence.png", ladder_dir / "cot.png"
        plot_emergence(ladder, samples, plots["emergence"])
        plot_cot(ladder, samples, plots["cot"])
    if words:
        plots["few-shot"] = ladder_dir / "fewshot.png"
        plot_fewshot(ladder, samples, plots["few-shot"])
    return plots


# ---------------------------------------------------------------------------------------------
# The ladder's section


def read_ladder(ladder_dir: Path) -> dict:
    """ladder.json, refused in one line when it is not what ``gptlab ladder`` writes."""
    path = ladder_dir / "ladder.json"
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: the ladder has not finished; finish it with `gptlab ladder --out {ladder_dir}`"
        )
    fix = f"`gptlab ladder --out {ladder_dir}` writes it again from the runs it finished"
    try:
        ladder = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}") from None
    problem = _ladder_problem(ladder)
    if problem:
        raise UserError(f"{path} is not a ladder's results: {problem}; {fix}")
    return ladder


def _ladder_problem(ladder) -> str | None:
    """What makes ``ladder`` other than the object ``run_ladder`` writes, in the fields the report reads."""
    if not isinstance(ladder, dict):
        return "it is not a JSON object"
    runs = ladder.get("runs")
    if not isinstance(runs, list) or not runs:
        return "it has no 'runs' list with at least one run"
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            return f"run {i} is not an object"
        for key, kind in LADDER_RUN_FIELDS.items():
            value = run.get(key)
            if isinstance(value, bool) or not isinstance(value, kind):
                return f"run {i} has no {key!r} ({LADDER_KIND_NAMES[kind]})"
    fit = ladder.get("fit")
    if not isinstance(fit, dict) or not all(isinstance(fit.get(key), dict) for key in ("power_law", "chinchilla")):
        return "it has no 'fit' object with 'power_law' and 'chinchilla'"
    if not isinstance(fit.get("monotone"), bool):
        return "its 'fit' has no 'monotone' (true or false)"
    return None


def ladder_section(ladder_dir: Path, extra: list[Claim] = (), heading: str = "#", link_prefix: str = "") -> Section:
    """The ladder's part of a report. Its plots are written into ladder_dir first; their links in
    the markdown get ``link_prefix`` so a report in another folder (the demo's) finds them."""
    ladder = read_ladder(ladder_dir)
    runs = ladder["runs"]
    samples = Samples(ladder_dir, runs)
    plots = plot_ladder(ladder_dir, ladder, samples)
    claims = ladder_claims(ladder, samples, extra or NOT_YET)
    h = heading
    lines = [
        f"{h} Scaling ladder",
        "",
        "| run | parameters | tokens | FLOPs | val loss | train s |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['name']} | {r['params']:,} | {r['tokens']:,} | {r['flops']:.2e} | {r['val_loss']:.3f} | "
            f"{r['train_seconds']:.0f} |"
            for r in runs
        ),
        "",
        _power_law_line(ladder["fit"]["power_law"]),
        "",
        _chinchilla_line(ladder["fit"]["chinchilla"]),
        "",
        f"{h}# Phenomena",
        "",
        (
            "Effects with seeded 95% bootstrap intervals over the evaluated items (paired where the items are the "
            "same); accuracy effects in points. Reproduced = the interval excludes zero in the claimed direction."
        ),
        "",
        "| claim | measure | effect [95% CI] | reproduced | note |",
        "|---|---|---|---|---|",
        *(c.row() for c in claims),
        "",
        f"{h}# Abilities by size (accuracy, %)",
        "",
        *_abilities_table(runs, samples),
        "",
        *_mmlu_window_lines(ladder),
        f"{h}# In-context learning of {runs[-1]['name']} (accuracy %, 95% bootstrap interval)",
        "",
        *_in_context_table(runs[-1], samples),
        "",
        "\n\n".join(f"![{caption}]({link_prefix}{path.name})" for caption, path in plots.items()),
    ]
    return Section("\n".join(lines), list(plots.values()), claims)


def _power_law_line(fit: dict) -> str:
    if "alpha" not in fit:
        return f"Power law: not fitted ({fit.get('unsupported')})."
    law = f"Power law: L(C) = {fit['a']:.3g}·(C)^-{fit['alpha']:.3f} + {fit['l_inf']:.3f}"
    if not fit.get("intervals"):
        return law + " (exact with 3 points: no interval)"
    lo, hi = fit["intervals"]["alpha"]
    return law + f", α 95% interval [{lo:.3f}, {hi:.3f}]"


def _chinchilla_line(fit: dict) -> str:
    if "E" not in fit:
        return f"Chinchilla L(N, D): not fitted ({fit.get('unsupported')})."
    return f"Chinchilla L(N, D): E = {fit['E']:.3f}, α = {fit['alpha']:.3f}, β = {fit['beta']:.3f}."


def _mean(run: dict, task: str, setting: str, metric: str = "acc") -> str:
    result = run["metrics"].get(task, {}).get(setting, {})
    value = result.get(metric, result.get("exact_match"))
    return "—" if value is None else f"{value * 100:.1f}"


def _abilities_table(runs: list[dict], samples: Samples) -> list[str]:
    """Accuracy of every run: world_mmlu by shots, the word tasks pooled by shots, arithmetic pooled by prompting."""
    metrics = runs[-1]["metrics"]
    arith, words, word_settings = _abilities(metrics)
    mmlu_settings = list(metrics.get("world_mmlu", {}))
    columns = [f"world_mmlu {s}" for s in mmlu_settings] + [f"words {s}" for s in word_settings]
    lines = [
        "| run | " + " | ".join(columns + ["arith standard", "arith CoT"]) + " |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for r in runs:
        cells = [_mean(r, "world_mmlu", s) for s in mmlu_settings]
        cells += [f"{samples.vector(r['name'], words, s)[1].mean() * 100:.1f}" for s in word_settings]
        cells += [
            f"{samples.vector(r['name'], arith, s)[1].mean() * 100:.1f}" if arith else "—" for s in ("standard", "cot")
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines


def _mmlu_window_lines(ladder: dict) -> list[str]:
    """How long the world_mmlu requests are against the models' window and their training windows,
    and how many were cut from the left to fit (a paragraph and a blank line; none without world_mmlu)."""
    runs = ladder["runs"]
    settings = sorted(runs[-1]["metrics"].get("world_mmlu", {}), key=_shots)
    if not settings:
        return []
    cut = ", ".join(
        f"{s} {sum(r['metrics']['world_mmlu'].get(s, {}).get('truncated', 0) for r in runs):,}" for s in settings
    )
    line = f"world_mmlu scoring requests (one per choice) cut from the left to fit the window, all runs: {cut}."
    lengths = ladder.get("mmlu_requests")
    if lengths:
        longest = ", ".join(f"{n:,} tokens at {s}" for s, n in lengths["longest"].items())
        line += (
            f" The longest request: {longest}; the models' window is {lengths['window']:,} tokens and they trained on "
            f"{lengths['trained']:,}-token windows."
        )
    return [line, ""]


def _in_context_table(run: dict, samples: Samples) -> list[str]:
    """One run's accuracy in every setting, pooled by ability, with a bootstrap interval."""
    arith, words, word_settings = _abilities(run["metrics"])
    groups = [
        ("world_mmlu", ["world_mmlu"], list(run["metrics"].get("world_mmlu", {}))),
        ("word tasks, pooled", words, word_settings),
        ("arithmetic, pooled", arith, ["standard", "cot"]),
    ]
    lines = ["| ability | setting | accuracy [95% CI] | items |", "|---|---|---|---|"]
    for label, tasks, settings in groups:
        for setting in settings if tasks else []:
            values = samples.vector(run["name"], tasks, setting)[1]
            if values.size:
                mean, lo, hi = stats.bootstrap_mean_interval(values)
                interval = f"{mean * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}]"
                lines.append(f"| {label} | {setting} | {interval} | {values.size} |")
    return lines


def write_ladder_report(ladder_dir: Path) -> Path:
    path = RunFolder(ladder_dir).report_path
    write_text_atomic(path, ladder_section(ladder_dir).markdown + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# A training run's card


def write_run_report(run_dir: Path) -> Path:
    """A training run's report card: what ran, how far, its losses, speed and memory, and its config."""
    run = RunFolder(run_dir)
    write_text_atomic(run.report_path, training_run_section(run).markdown + "\n")
    return run.report_path


def training_run_section(run: RunFolder, stage_rows: Sequence[str] = ()) -> Section:
    """The card's markdown and loss plot; ``stage_rows``: the stage's own lines of the table."""
    record = run.read_record()
    metrics = run.read_metrics()
    if not any("loss" in m for m in metrics):
        raise UserError(f"{run.metrics_path} holds no logged step yet: report the run once it has logged one")
    plot = run.path / "loss.png"
    plot_pretraining_loss(metrics, plot, title=f"Training run {run.path.name}")
    config = record.get("config", {})
    lines = [
        f"# Training run {run.path.name}",
        "",
        f"`{' '.join(record.get('argv', [])) or 'command not recorded'}`",
        "",
        _provenance(record),
        "",
        "| | |",
        "|---|---|",
        *_progress_rows(record, metrics),
        *stage_rows,
        *_resource_rows(record, metrics),
        "",
        f"![loss]({plot.name})",
    ]
    if config:
        lines += ["", "## Config", "", "```json", json.dumps(config, indent=1), "```"]
    return Section("\n".join(lines), [plot])


def _provenance(record: dict) -> str:
    """Versions, commit and device the run.json records, on one line."""
    versions = record.get("versions", {})
    return (
        ", ".join(f"{name} {version}" for name, version in versions.items())
        + (f"; commit {record['git_commit'][:12]}" if record.get("git_commit") else "")
        + (f"; {record['device']}" if "device" in record else "")
        + (f" x {record['world_size']} processes" if record.get("world_size", 1) > 1 else "")
    )


def _progress_rows(record: dict, metrics: list[dict]) -> list[str]:
    """Parameters, steps, tokens and losses: how far the run got."""
    logged = [m for m in metrics if "loss" in m]
    validated = [m for m in metrics if "val_loss" in m]
    rows = [f"| parameters | {record['params']:,} |"] if "params" in record else []
    planned = record.get("config", {}).get("train", {}).get("max_steps")
    rows.append(f"| steps | {metrics[-1]['step']:,}" + (f" of {planned:,}" if planned else "") + " |")
    rows.append(f"| tokens | {logged[-1]['tokens']:,} (to step {logged[-1]['step']:,}) |")
    rows.append(f"| train loss, last logged | {logged[-1]['loss']:.4f} (step {logged[-1]['step']:,}) |")
    if validated:
        best = min(validated, key=lambda m: m["val_loss"])
        rows.append(
            f"| val loss, last / best | {validated[-1]['val_loss']:.4f} (step {validated[-1]['step']:,}) / "
            f"{best['val_loss']:.4f} (step {best['step']:,}) |"
        )
    return rows


def _resource_rows(record: dict, metrics: list[dict]) -> list[str]:
    """Throughput, MFU and peak memory over the logged windows."""
    logged = [m for m in metrics if "loss" in m]
    rows = []
    speeds = [m["tok_per_s"] for m in logged if "tok_per_s" in m]
    if speeds:
        mfus = [m["mfu"] for m in logged if m.get("mfu") is not None]
        windows = f"{len(speeds)} logged window{'s' if len(speeds) > 1 else ''}"
        rows.append(
            f"| throughput, median of {windows} | {float(np.median(speeds)):,.0f} tokens/s"
            + (f", MFU {float(np.median(mfus)):.1%}" if mfus else "")
            + " |"
        )
    memory = [m["peak_mem_mb"] for m in logged if "peak_mem_mb" in m]
    if memory:
        what = "allocated on the GPU" if record.get("device", "").startswith("cuda") else "process RSS"
        rows.append(f"| peak memory ({what}) | {max(memory):,.1f} MB |")
    return rows


def write_reward_report(run_dir: Path) -> Path:
    """A reward-model run's card: the training card with how often the model prefers the chosen answer."""
    run = RunFolder(run_dir)
    section = training_run_section(run, _reward_rows(run.read_metrics()))
    write_text_atomic(run.report_path, section.markdown + "\n")
    return run.report_path


def _reward_rows(metrics: list[dict]) -> list[str]:
    """Accuracy (r_chosen > r_rejected) and mean margin on the training pairs' last logged window and
    on the held-out pairs."""
    rows = []
    logged = [m for m in metrics if "accuracy" in m]
    if logged:
        last = logged[-1]
        rows.append(
            f"| training pairs, last logged: accuracy / margin | {last['accuracy']:.1%} / {last['margin']:.3f} "
            f"(step {last['step']:,}) |"
        )
    evaluated = [m for m in metrics if "eval_accuracy" in m]
    if evaluated:
        last, best = evaluated[-1], max(evaluated, key=lambda m: m["eval_accuracy"])
        rows.append(
            f"| held-out pairs: accuracy, last / best | {last['eval_accuracy']:.1%} (step {last['step']:,}) / "
            f"{best['eval_accuracy']:.1%} (step {best['step']:,}) |"
        )
        rows.append(f"| held-out pairs, last: loss / margin | {last['eval_loss']:.4f} / {last['eval_margin']:.3f} |")
    return rows


def write_dpo_report(run_dir: Path) -> Path:
    """A DPO run's card: the training card with TRL's preference metrics, first and last, and their plot."""
    run = RunFolder(run_dir)
    metrics = run.read_metrics()
    card = training_run_section(run, _dpo_rows(metrics))
    plot = run.path / "rewards.png"
    plot_dpo_rewards(metrics, plot, title=f"DPO run {run.path.name}")
    rewards = Section(
        "## Implicit rewards\n\nA reward is β·(log π − log π_ref) of an answer; rewards/accuracies is the share of "
        "pairs whose chosen answer has the higher one, rewards/margins their mean difference.\n\n"
        f"![rewards]({plot.name})",
        [plot],
    )
    write_text_atomic(run.report_path, concatenate([card, rewards]))
    return run.report_path


def _dpo_rows(metrics: list[dict]) -> list[str]:
    """Rewards and log-probs on the training pairs' first and last logged windows, and on the held-out pairs."""
    logged = [m for m in metrics if "rewards/margins" in m]
    rows = []
    if logged:
        first, last = logged[0], logged[-1]
        for name, form in (
            ("rewards/accuracies", ".1%"),
            ("rewards/margins", ".3f"),
            ("rewards/chosen", "+.3f"),
            ("rewards/rejected", "+.3f"),
            ("logps/chosen", ".2f"),
            ("logps/rejected", ".2f"),
        ):
            rows.append(
                f"| {name}, first → last logged | {first[name]:{form}} (step {first['step']:,}) → "
                f"{last[name]:{form}} (step {last['step']:,}) |"
            )
    evaluated = [m for m in metrics if "eval_rewards/margins" in m]
    if evaluated:
        last = evaluated[-1]
        rows.append(
            f"| held-out pairs, last: eval_loss / eval_rewards/accuracies / eval_rewards/margins | "
            f"{last['eval_loss']:.4f} / {last['eval_rewards/accuracies']:.1%} / {last['eval_rewards/margins']:.3f} "
            f"(step {last['step']:,}) |"
        )
    return rows


def first_to_last_rows(metrics: list[dict], formats: Sequence[tuple[str, str]]) -> list[str]:
    """A row per (metric, number format): its first and last logged values, with their steps."""
    rows = []
    for name, form in formats:
        logged = [m for m in metrics if name in m]
        if logged:
            first, last = logged[0], logged[-1]
            rows.append(
                f"| {name}, first → last logged | {first[name]:{form}} (step {first['step']:,}) → "
                f"{last[name]:{form}} (step {last['step']:,}) |"
            )
    return rows


# What an RL run's card shows of its metrics (TRL's names), and the curves it plots.
GRPO_ROWS = (
    ("reward", ".3f"),
    ("reward_std", ".3f"),
    ("kl", ".4f"),
    ("completions/mean_length", ".1f"),
    ("completions/clipped_ratio", ".1%"),
    ("frac_reward_zero_std", ".1%"),
    ("entropy", ".3f"),
)
GRPO_CURVES = ("reward", "kl", "completions/mean_length")
PPO_ROWS = (
    ("objective/scores", ".3f"),
    ("objective/kl", ".3f"),
    ("objective/non_score_reward", ".3f"),
    ("objective/rlhf_reward", ".3f"),
    ("objective/entropy", ".2f"),
    ("completions/mean_length", ".1f"),
    ("val/num_eos_tokens", ".1f"),
    ("policy/clipfrac_avg", ".1%"),
    ("policy/approxkl_avg", ".4f"),
    ("loss/value_avg", ".4f"),
)
PPO_CURVES = ("objective/scores", "objective/kl", "objective/rlhf_reward")


def write_grpo_report(run_dir: Path) -> Path:
    """A GRPO run's card: the training card with its rewards, KL and lengths, first and last, and their curves."""
    run = RunFolder(run_dir)
    metrics = run.read_metrics()
    functions = sorted({name for m in metrics for name in m if name.startswith("rewards/") and name.endswith("/mean")})
    rows = first_to_last_rows(metrics, [*GRPO_ROWS[:2], *((name, ".3f") for name in functions), *GRPO_ROWS[2:]])
    return _write_rl_report(run, rows, GRPO_CURVES, "GRPO", "reward is the weighted sum of the reward functions")


def write_ppo_report(run_dir: Path) -> Path:
    """A PPO run's card: the training card with TRL's objective metrics, first and last, and their curves."""
    run = RunFolder(run_dir)
    note = (
        "objective/scores is the reward model's score (after any missing-EOS penalty), objective/kl the KL to the "
        "reference summed over an answer's tokens, objective/rlhf_reward the score minus kl_coef times that KL"
    )
    return _write_rl_report(run, first_to_last_rows(run.read_metrics(), PPO_ROWS), PPO_CURVES, "PPO", note)


def _write_rl_report(run: RunFolder, rows: list[str], curves: Sequence[str], stage: str, note: str) -> Path:
    card = training_run_section(run, rows)
    plot = run.path / "rl.png"
    plot_rl_curves(run.read_metrics(), plot, curves, f"{stage} run {run.path.name}")
    section = Section(f"## Rewards and KL\n\nOver the rollouts: {note}.\n\n![rewards and KL]({plot.name})", [plot])
    write_text_atomic(run.report_path, concatenate([card, section]))
    return run.report_path


# ---------------------------------------------------------------------------------------------
# Which report a folder gets

# The report of each kind of run (runs.KINDS) that has one; a new stage adds its line.
REPORTS = {
    "pretrain": write_run_report,
    "sft": write_run_report,
    "reward": write_reward_report,
    "dpo": write_dpo_report,
    "ppo": write_ppo_report,
    "grpo": write_grpo_report,
    "ladder": write_ladder_report,
}


def write_reports(folder: Path) -> list[Path]:
    """``report.md`` for the run in ``folder``, by the kind its run.json records; for a demo's
    folder, or a folder without run.json, one for each run folder directly inside it."""
    kind = recorded_kind(folder)
    if kind in REPORTS:
        return [REPORTS[kind](folder)]
    if kind not in (None, "demo"):
        raise UserError(f"{folder} holds a run of kind {kind!r}, which `gptlab report` does not report yet")
    children = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    written = [REPORTS[child_kind](child) for child in children if (child_kind := recorded_kind(child)) in REPORTS]
    if not written:
        raise UserError(
            f"{folder} holds no run: give a folder written by `gptlab ladder`, `pretrain`, `sft` or `demo` "
            "(with its run.json), or a folder of them"
        )
    return written


def recorded_kind(folder: Path) -> str | None:
    """The kind of run ``folder`` holds, as its run.json records it; None without run.json."""
    run = RunFolder(folder)
    if not run.has_record():
        return None
    if "kind" not in run.read_record():
        return kind_from_files_before_kinds_were_recorded(run)
    return run.kind()


def kind_from_files_before_kinds_were_recorded(run: RunFolder) -> str | None:
    """The one place a kind is guessed: a run.json written before gptlab recorded kinds came from
    a ladder (which wrote ladder.json beside it) or a training run (metrics.jsonl; pretrain and
    SFT get the same report). None: neither has written its results yet."""
    if (run.path / "ladder.json").is_file():
        return "ladder"
    return "pretrain" if run.metrics_path.is_file() else None
