"""Reports: a ladder folder -> ``report.md`` with PNG plots and the phenomena table; a training
run's folder (pretrain, SFT) -> ``report.md`` with its loss curves and figures.

Every claim of the lecture is stated, measured on the ladder's own samples with a seeded 95%
bootstrap interval, and marked reproduced only when the interval excludes zero in the claimed
direction. A claim the ladder cannot measure says so; one that did not appear is reported as not
appearing, with what would be needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptlab import scaling
from gptlab.config import read_run_record
from gptlab.data.documents import jsonl_records, read_metrics
from gptlab.errors import UserError
from gptlab.fileio import write_text_atomic


@dataclass
class Claim:
    claim: str
    measure: str
    effect: float | None = None
    lo: float | None = None
    hi: float | None = None
    note: str = ""
    unit: str = "points"  # "points": accuracy differences shown x100; "exponent": as is

    @property
    def reproduced(self) -> bool | None:
        return None if self.lo is None else self.lo > 0

    def row(self) -> str:
        if self.effect is None:
            measured, verdict = "not measured yet", "—"
        else:
            scale = 100 if self.unit == "points" else 1
            fmt = "{:+.1f}" if self.unit == "points" else "{:.3f}"
            measured = f"{fmt.format(self.effect * scale)} [{fmt.format(self.lo * scale)}, {fmt.format(self.hi * scale)}]"
            verdict = "yes" if self.reproduced else "no"
        return f"| {self.claim} | {self.measure} | {measured} | {verdict} | {self.note} |"


# ---------------------------------------------------------------------------------------------
# Per-item scores


class Samples:
    """Per-item scores of every run, keyed by (run name, task, setting) -> {item: score}."""

    def __init__(self, ladder_dir: Path, runs: list[dict]):
        self.scores: dict[tuple[str, str, str, str], dict] = {}
        for run in runs:
            for _, s in jsonl_records(ladder_dir / "runs" / run["name"] / "samples.jsonl"):
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
    return scaling.difference_interval(a, b, paired=True) if a.size else None


def _gain_growth(samples: Samples, small: str, large: str, tasks: list[str], base: str, better: str):
    """(gain of the large model) - (gain of the small one), paired over the items all four answered."""
    s_base, s_better, l_base, l_better = samples.paired(
        (small, base), (small, better), (large, base), (large, better), tasks=tasks
    )
    return _difference(s_better - s_base, l_better - l_base)


# ---------------------------------------------------------------------------------------------
# Claims


def ladder_claims(ladder: dict, samples: Samples, extra: list[Claim] = ()) -> list[Claim]:
    runs = ladder["runs"]
    small, large = runs[0]["name"], runs[-1]["name"]
    metrics = runs[-1]["metrics"]
    arith = sorted(t for t in metrics if t.startswith("arith_"))
    words = sorted(t for t in metrics if t.startswith("words_"))
    word_k = sorted(int(s.split("-")[0]) for s in metrics[words[0]]) if words else []
    claims: list[Claim] = []

    fit = ladder["fit"]["power_law"]
    loss_claim = Claim("Loss falls smoothly with compute (power law)", "exponent α of L(C) = a·C^-α + L∞", unit="exponent")
    if "alpha" in fit and fit.get("intervals"):
        lo, hi = fit["intervals"]["alpha"]
        loss_claim.effect, loss_claim.lo, loss_claim.hi = fit["alpha"], lo, hi
        loss_claim.note = "monotone over the ladder" if ladder["fit"]["monotone"] else "NOT monotone over the ladder"
    else:
        loss_claim.note = fit.get("unsupported") or "a fit with an interval needs at least 4 sizes"
        if "alpha" in fit:
            loss_claim.note += f" (exact fit: α = {fit['alpha']:.3f})"
    claims.append(loss_claim)

    if words and word_k:
        k = f"{word_k[-1]}-shot"
        claims.append(_claim(
            "An ability appears with scale (exact match)", f"word tasks {k}, exact match, {large} minus {small}",
            samples.paired((small, k), (large, k), tasks=words),
            "if no: the largest model is still below the task's threshold; a longer ladder or more compute",
        ))
        if len(runs) >= 2:
            # The sizes before exact match first leaves the smallest model's: if partial credit
            # has already risen by the last of them, the all-or-nothing metric hid a gradual gain.
            before = before_em = None
            for run in runs[1:]:
                em = _difference(*samples.paired((small, k), (run["name"], k), tasks=words))
                if em is None or em[1] > 0:
                    break
                before, before_em = run["name"], em
            claim = Claim(
                "The jump is partly the metric (Schaeffer et al.)",
                f"word tasks {k}, partial credit (1 - edit distance), {before or runs[1]['name']} minus {small}: "
                "the largest size whose exact match has not moved",
            )
            if before is None:
                claim.note = "exact match already moves at the second size: a ladder with finer steps is needed"
            else:
                pc = _difference(*samples.paired((small, k), (before, k), tasks=words, metric="partial_credit"))
                if pc:
                    claim.effect, claim.lo, claim.hi = pc
                    em = before_em
                    claim.note = f"exact match over the same step: {em[0] * 100:+.1f} [{em[1] * 100:+.1f}, {em[2] * 100:+.1f}]"
            claims.append(claim)
    if arith:
        claims.append(_claim(
            "Arithmetic appears with scale (exact match)",
            f"arithmetic exact match, {large} minus {small}, standard prompting",
            samples.paired((small, "standard"), (large, "standard"), tasks=arith),
            "if no: arithmetic needs more compute per model than this ladder spends (docs/tinyworld.md)",
        ))
    if words and word_k and word_k[-1] > 0:
        claims.append(_claim(
            "Few-shot beats zero-shot", f"word tasks, {k} minus 0-shot accuracy, {large}",
            samples.paired((large, "0-shot"), (large, k), tasks=words), "if no: more word-task episodes (mixture.words)",
        ))
        claims.append(_claim(
            "The few-shot gain grows with size", f"({k} - 0-shot) of {large} minus that of {small}",
            _gain_growth(samples, small, large, words, "0-shot", k), "if no: a wider ladder",
        ))
    if arith:
        claims.append(_claim(
            "Chain of thought beats standard prompting", f"arithmetic exact match, CoT minus standard, {large}",
            samples.paired((large, "standard"), (large, "cot"), tasks=arith),
            "if no: CoT needs models trained past the worked-solution format; more compute per model",
        ))
        claims.append(_claim(
            "The CoT gain grows with size", f"(CoT - standard) of {large} minus that of {small}",
            _gain_growth(samples, small, large, arith, "standard", "cot"), "if no: a wider ladder",
        ))
    if "world_mmlu" in metrics and "5-shot" in metrics["world_mmlu"]:
        claim = _claim(
            "Few-shot helps multiple choice (MMLU format)", f"world_mmlu 5-shot minus 0-shot, {large}",
            samples.paired((large, "0-shot"), (large, "5-shot"), tasks=["world_mmlu"]), "",
        )
        cut = metrics["world_mmlu"]["5-shot"].get("truncated", 0)
        if cut:
            claim.note = (f"{cut} of the 5-shot scoring requests (one per choice) are longer than the model's window and were cut from the "
                          "left (lm-eval's rule); a longer block_size would keep all five examples")
        claims.append(claim)
    claims.extend(extra)
    return claims


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
    Claim("Instruction tuning gives zero-shot gains on unseen tasks", "SFT zero-shot minus base few-shot, held-out families",
          note="measured by `gptlab demo` (SFT stage)"),
    Claim("RLHF / DPO move a model toward human preferences", "oracle win rate vs the SFT model", note="alignment stage not built yet"),
    Claim("The arena ranks models by preference", "Elo / Bradley-Terry with the oracle as judge", note="arena not built yet"),
]


# ---------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _save_line_plot(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size=None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    _save(plt, fig, path)


def plot_pretraining_loss(metrics: list[dict], path: Path, title: str = "Pretraining on TinyWorld") -> None:
    plt = _plt()
    logged = [m for m in metrics if "loss" in m]
    train = [(m["tokens"], m["loss"]) for m in logged]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    tokens_per_step = logged[-1]["tokens"] / logged[-1]["step"]  # the last record may be evaluation only
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot([s * tokens_per_step for s, _ in val], [v for _, v in val], "o-", label="val loss")
    _save_line_plot(plt, fig, ax, path, "tokens", "cross-entropy (nats/token)", title)


def plot_loss(ladder: dict, path: Path) -> None:
    plt = _plt()
    runs = ladder["runs"]
    compute = np.array([r["flops"] for r in runs])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(compute, [r["val_loss"] for r in runs], "o", label="val loss")
    for r in runs:
        ax.annotate(f"{r['name']} ({r['params'] / 1e6:.2f}M)", (r["flops"], r["val_loss"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    fit = ladder["fit"]["power_law"]
    if "alpha" in fit:
        grid = np.geomspace(compute.min() / 1.5, compute.max() * 1.5, 100)
        ax.plot(grid, fit["a"] * grid ** (-fit["alpha"]) + fit["l_inf"], "--",
                label=f"fit: {fit['a']:.3g}·C^-{fit['alpha']:.3f} + {fit['l_inf']:.2f}")
    ax.set_xscale("log")
    _save_line_plot(plt, fig, ax, path, "training compute (FLOPs)", "val loss (nats/token)", "Loss vs compute", 8)


def plot_emergence(ladder: dict, samples: Samples, path: Path) -> None:
    """Each ability against compute under exact match (left) and partial credit (right)."""
    plt = _plt()
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
    _save(plt, fig, path)


def plot_fewshot(ladder: dict, samples: Samples, path: Path) -> None:
    plt = _plt()
    runs = ladder["runs"]
    words = sorted(t for t in runs[-1]["metrics"] if t.startswith("words_"))
    ks = sorted(int(s.split("-")[0]) for s in runs[-1]["metrics"][words[0]])
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot(ks, [samples.vector(r["name"], words, f"{k}-shot")[1].mean() for k in ks], "o-",
                label=f"{r['name']} ({r['params'] / 1e6:.2f}M)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks, [str(k) for k in ks])
    _save_line_plot(
        plt, fig, ax, path, "examples in the prompt (k)", "accuracy, word tasks pooled",
        "In-context learning vs model size", 8,
    )


def plot_cot(ladder: dict, samples: Samples, path: Path) -> None:
    plt = _plt()
    runs = ladder["runs"]
    tasks = sorted(t for t in runs[-1]["metrics"] if t.startswith("arith_"))
    effects = [_difference(*samples.paired((r["name"], "standard"), (r["name"], "cot"), tasks=tasks)) or (np.nan,) * 3
               for r in runs]
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
    _save(plt, fig, path)


# ---------------------------------------------------------------------------------------------
# The report


def _mean(run: dict, task: str, setting: str, metric: str = "acc") -> str:
    result = run["metrics"].get(task, {}).get(setting, {})
    value = result.get(metric, result.get("exact_match"))
    return "—" if value is None else f"{value * 100:.1f}"


def ladder_section(ladder_dir: Path, extra: list[Claim] = (), heading: str = "#", link_prefix: str = "") -> str:
    """The ladder's part of a report (markdown) and its plots, written into ladder_dir; image links
    get ``link_prefix`` so a report in another folder (the demo's) finds them."""
    ladder = json.loads((ladder_dir / "ladder.json").read_text())
    runs = ladder["runs"]
    samples = Samples(ladder_dir, runs)
    plot_loss(ladder, ladder_dir / "loss_vs_compute.png")
    plots = [f"![loss vs compute]({link_prefix}loss_vs_compute.png)"]
    metrics = runs[-1]["metrics"]
    if any(t.startswith("arith_") for t in metrics):
        plot_emergence(ladder, samples, ladder_dir / "emergence.png")
        plot_cot(ladder, samples, ladder_dir / "cot.png")
        plots += [f"![emergence]({link_prefix}emergence.png)", f"![cot]({link_prefix}cot.png)"]
    if any(t.startswith("words_") for t in metrics):
        plot_fewshot(ladder, samples, ladder_dir / "fewshot.png")
        plots.append(f"![few-shot]({link_prefix}fewshot.png)")
    claims = ladder_claims(ladder, samples, extra or NOT_YET)
    h = heading
    fit = ladder["fit"]["power_law"]
    fit_line = (
        f"Power law: L(C) = {fit['a']:.3g}·(C)^-{fit['alpha']:.3f} + {fit['l_inf']:.3f}"
        + (f", α 95% interval [{fit['intervals']['alpha'][0]:.3f}, {fit['intervals']['alpha'][1]:.3f}]"
           if fit.get("intervals") else " (exact with 3 points: no interval)")
        if "alpha" in fit else f"Power law: not fitted ({fit.get('unsupported')})."
    )
    chin = ladder["fit"]["chinchilla"]
    chin_line = (
        f"Chinchilla L(N, D): E = {chin['E']:.3f}, α = {chin['alpha']:.3f}, β = {chin['beta']:.3f}."
        if "E" in chin else f"Chinchilla L(N, D): not fitted ({chin.get('unsupported')})."
    )
    arith = sorted(t for t in metrics if t.startswith("arith_"))
    words = sorted(t for t in metrics if t.startswith("words_"))
    word_settings = sorted(metrics[words[0]], key=lambda s: int(s.split("-")[0])) if words else []
    lines = [
        f"{h} Scaling ladder",
        "",
        "| run | parameters | tokens | FLOPs | val loss | train s |",
        "|---|---|---|---|---|---|",
        *(f"| {r['name']} | {r['params']:,} | {r['tokens']:,} | {r['flops']:.2e} | {r['val_loss']:.3f} | "
          f"{r['train_seconds']:.0f} |" for r in runs),
        "",
        fit_line,
        "",
        chin_line,
        "",
        f"{h}# Phenomena",
        "",
        "Effects with seeded 95% bootstrap intervals over the evaluated items (paired where the items are the "
        "same); accuracy effects in points. Reproduced = the interval excludes zero in the claimed direction.",
        "",
        "| claim | measure | effect [95% CI] | reproduced | note |",
        "|---|---|---|---|---|",
        *(c.row() for c in claims),
        "",
        f"{h}# Abilities by size (accuracy, %)",
        "",
        "| run | " + " | ".join(
            [f"world_mmlu {s}" for s in metrics.get("world_mmlu", {})]
            + [f"words {s}" for s in word_settings]
            + ["arith standard", "arith CoT"]) + " |",
        "|---|" + "---|" * (len(metrics.get("world_mmlu", {})) + len(word_settings) + 2),
    ]
    for r in runs:
        cells = [_mean(r, "world_mmlu", s) for s in metrics.get("world_mmlu", {})]
        cells += [f"{samples.vector(r['name'], words, s)[1].mean() * 100:.1f}" for s in word_settings]
        cells += [f"{samples.vector(r['name'], arith, s)[1].mean() * 100:.1f}" if arith else "—" for s in ("standard", "cot")]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", f"{h}# In-context learning of {runs[-1]['name']} (accuracy %, 95% bootstrap interval)", "",
              "| ability | setting | accuracy [95% CI] | items |", "|---|---|---|---|"]
    groups = [("world_mmlu", ["world_mmlu"], list(metrics.get("world_mmlu", {}))),
              ("word tasks, pooled", words, word_settings), ("arithmetic, pooled", arith, ["standard", "cot"])]
    for label, tasks, settings in groups:
        for setting in settings if tasks else []:
            values = samples.vector(runs[-1]["name"], tasks, setting)[1]
            if values.size:
                mean, lo, hi = scaling.bootstrap_mean_interval(values)
                lines.append(f"| {label} | {setting} | {mean * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}] | {values.size} |")
    lines += ["", *(p + "\n" for p in plots)]
    return "\n".join(lines)


def write_ladder_report(ladder_dir: Path) -> Path:
    path = ladder_dir / "report.md"
    write_text_atomic(path, ladder_section(ladder_dir) + "\n")
    return path


def write_reports(folder: Path) -> list[Path]:
    """``report.md`` for a ladder folder or a training run's folder, or for each such folder
    directly inside ``folder`` (a demo's: its ladder and its SFT run)."""

    def writer(path: Path):
        if (path / "ladder.json").is_file():
            return write_ladder_report
        return write_run_report if (path / "metrics.jsonl").is_file() else None

    if write := writer(folder):
        return [write(folder)]
    children = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    written = [write(child) for child in children if (write := writer(child))]
    if not written:
        raise UserError(
            f"{folder} holds no run: give a folder written by `gptlab ladder`, `pretrain` or `sft` "
            "(with ladder.json or metrics.jsonl), or a folder of them"
        )
    return written


def write_run_report(run_dir: Path) -> Path:
    """A training run's report card: what ran, how far, its losses, speed and memory, and its config."""
    record = read_run_record(run_dir / "run.json", "restore it or remove it") if (run_dir / "run.json").is_file() else {}
    metrics = read_metrics(run_dir / "metrics.jsonl")
    logged = [m for m in metrics if "loss" in m]
    if not logged:
        raise UserError(f"{run_dir / 'metrics.jsonl'} holds no logged step yet: report the run once it has logged one")
    config = record.get("config", {})
    validated = [m for m in metrics if "val_loss" in m]
    last = metrics[-1]
    versions = record.get("versions", {})
    lines = [
        f"# Training run {run_dir.name}",
        "",
        f"`{' '.join(record.get('argv', [])) or 'command not recorded'}`",
        "",
        ", ".join(f"{name} {version}" for name, version in versions.items())
        + (f"; commit {record['git_commit'][:12]}" if record.get("git_commit") else "")
        + (f"; {record['device']}" if "device" in record else "")
        + (f" x {record['world_size']} processes" if record.get("world_size", 1) > 1 else ""),
        "",
        "| | |",
        "|---|---|",
    ]
    if "params" in record:
        lines.append(f"| parameters | {record['params']:,} |")
    planned = config.get("train", {}).get("max_steps")
    lines.append(f"| steps | {last['step']:,}" + (f" of {planned:,}" if planned else "") + " |")
    lines.append(f"| tokens | {logged[-1]['tokens']:,} (to step {logged[-1]['step']:,}) |")
    lines.append(f"| train loss, last logged | {logged[-1]['loss']:.4f} (step {logged[-1]['step']:,}) |")
    if validated:
        best = min(validated, key=lambda m: m["val_loss"])
        lines.append(
            f"| val loss, last / best | {validated[-1]['val_loss']:.4f} (step {validated[-1]['step']:,}) / "
            f"{best['val_loss']:.4f} (step {best['step']:,}) |"
        )
    speeds = [m["tok_per_s"] for m in logged if "tok_per_s" in m]
    if speeds:
        mfus = [m["mfu"] for m in logged if m.get("mfu") is not None]
        lines.append(
            f"| throughput, median of {len(speeds)} logged window{'s' if len(speeds) > 1 else ''} | {float(np.median(speeds)):,.0f} tokens/s"
            + (f", MFU {float(np.median(mfus)):.1%}" if mfus else "") + " |"
        )
    memory = [m["peak_mem_mb"] for m in logged if "peak_mem_mb" in m]
    if memory:
        what = "allocated on the GPU" if record.get("device", "").startswith("cuda") else "process RSS"
        lines.append(f"| peak memory ({what}) | {max(memory):,.1f} MB |")
    plot_pretraining_loss(metrics, run_dir / "loss.png", title=f"Training run {run_dir.name}")
    lines += ["", "![loss](loss.png)"]
    if config:
        lines += ["", "## Config", "", "```json", json.dumps(config, indent=1), "```"]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
