"""Run tasks against a backend: build every prompt, send all of a task's requests at once (the
backend sorts and batches them), score each sample, aggregate with standard errors.

Results are keyed by task, and by shot count when several are asked:
``{"results": {"mmlu": {"acc": .., "acc_stderr": .., "n": ..}}}`` for one shot count,
``{"results": {"mmlu": {"0-shot": {...}, "5-shot": {...}}}}`` for several. Perplexity tasks take
no shots and are never nested.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from gptlab.errors import UserError
from gptlab.eval import metrics
from gptlab.eval.backends import Backend, GenerationRequest
from gptlab.eval.tasks import GEN, MC, PPL, Task, expand_names, load_task
from gptlab.fileio import write_json_atomic, write_text_atomic

MC_METRICS = ("acc", "acc_norm", "acc_bytes")


def evaluate(
    backend: Backend,
    tasks: Sequence[str],
    data: str | os.PathLike | None = None,
    shots: Sequence[int] = (0,),
    cot: bool = False,
    batch_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    return_samples: bool = False,
    chat: bool = False,
) -> dict[str, Any]:
    """Evaluate ``backend`` on ``tasks`` (names or .toml paths) at each shot count.

    ``data`` is what the tasks read: a TinyWorld folder (world_mmlu, arith_*, words_*), an MMLU
    folder, a GSM8K JSONL file or a text file. ``limit`` keeps the first n test documents (per
    subject for MMLU, as lm-eval's per-subject tasks). ``chat`` asks generation tasks through the
    model's chat template, shots as earlier turns (lm-eval's ``--apply_chat_template
    --fewshot_as_multiturn``). Returns ``{"results", "config"}`` and,
    with ``return_samples``, ``"samples"``: one record per document and shot count.
    Every task is loaded and every shot count checked before the model runs.
    """
    shots = list(dict.fromkeys(int(k) for k in shots))
    _check_settings(shots, batch_size, limit)
    names, loaded = _load_tasks(tasks, data, shots, cot, limit, chat)
    results, samples = _run_tasks(backend, loaded, shots, seed, batch_size, chat)
    config = {
        "tasks": names,
        "shots": shots,
        "cot": cot,
        "chat": chat,
        "batch_size": batch_size,
        "limit": limit,
        "seed": seed,
        "data": None if data is None else str(data),
        "backend": backend.name,
        "versions": _versions(),
    }
    out: dict[str, Any] = {"results": results, "config": config}
    if return_samples:
        out["samples"] = samples
    return out


def _check_settings(shots: list[int], batch_size: int, limit: int | None) -> None:
    if not shots or min(shots) < 0:
        raise UserError(f"shots must be non-negative integers, got {shots}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1, got {limit}")


def _load_tasks(
    tasks: Sequence[str] | str,
    data: str | os.PathLike | None,
    shots: list[int],
    cot: bool,
    limit: int | None,
    chat: bool,
) -> tuple[list[str], list[Task]]:
    """The task names (group names such as ``words`` expanded) and the tasks loaded, each checked
    against every shot count and ``chat``, so a bad request fails before the model runs."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    data_path = Path(data) if data is not None else None
    names = expand_names([t.strip() for t in tasks if t.strip()], data_path)
    if not names:
        raise UserError("no task given: name at least one, e.g. --tasks world_mmlu")
    loaded = [load_task(name, data_path, cot=cot, limit=limit, need_shots=max(shots) > 0) for name in names]
    without_cot = [task.name for task in loaded if not task.has_cot]
    if cot and without_cot:
        raise UserError(
            "--cot applies only to the tasks with a chain-of-thought form (arith_*), not to "
            f"{', '.join(without_cot)}: evaluate those without --cot"
        )
    for task in loaded:
        if not task.docs:
            raise UserError(f"task {task.name} has no test documents (its test file is empty): give it some")
        if task.kind != PPL:
            for k in shots:
                task.check_shots(k)
        if chat and task.kind != GEN:
            raise UserError(f"--chat applies to generation tasks; {task.name} is {task.kind.replace('_', ' ')}")
    return names, loaded


def _run_tasks(
    backend: Backend, loaded: list[Task], shots: list[int], seed: int, batch_size: int, chat: bool
) -> tuple[dict[str, Any], list[dict]]:
    """``evaluate``'s results (see the module docstring for their nesting) and sample records."""
    results: dict[str, Any] = {}
    samples: list[dict] = []
    for task in loaded:
        task_shots = shots if task.kind != PPL else [0]
        for k in task_shots:
            before = Counter(backend.counters)
            scores, records = run_task(backend, task, k, seed, batch_size, chat)
            scores["truncated"] = backend.counters["truncated"] - before["truncated"]
            scores["seam_merges"] = backend.counters["seam_merges"] - before["seam_merges"]
            _warn_encoding(task.name, k, scores)
            if len(task_shots) > 1:
                results.setdefault(task.name, {})[f"{k}-shot"] = scores
            else:
                results[task.name] = scores
            samples += records
    return results, samples


@contextmanager
def warnings_as_lines(stream: TextIO | None = None) -> Iterator[None]:
    """Encoding warnings (truncations, seam merges) as one ``gptlab: warning:`` line each, the
    way the CLI reports everything, instead of Python's two-line warning format."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        print(f"gptlab: warning: {warning.message}", file=stream or sys.stderr)


def _warn_encoding(name: str, k: int, scores: dict) -> None:
    if scores["truncated"]:
        warnings.warn(
            f"task {name} ({k}-shot): {scores['truncated']} request(s) longer than the model were cut from the left",
            stacklevel=2,
        )
    if scores["seam_merges"]:
        warnings.warn(
            f"task {name} ({k}-shot): {scores['seam_merges']} continuation(s) merge with the end of their context "
            "when tokenized (tok(context) is not a prefix of tok(context + continuation)), so their scores cover "
            "other tokens than the continuation's own; lm-eval scores them the same way",
            stacklevel=2,
        )


def run_task(
    backend: Backend, task: Task, k: int, seed: int, batch_size: int, chat: bool = False
) -> tuple[dict, list[dict]]:
    """(aggregated scores, per-sample records) of one task at k shots."""
    if task.kind == MC:
        return _run_multiple_choice(backend, task, k, seed, batch_size)
    if task.kind == GEN:
        return _run_generation(backend, task, k, seed, batch_size, chat)
    return _run_perplexity(backend, task, batch_size)


def _record(task: Task, doc, k: int, **fields) -> dict:
    head = {"task": task.name}
    if doc.subject is not None:
        head["subject"] = doc.subject
    return {**head, "doc_id": doc.doc_id, "shots": k, **fields}


def _run_multiple_choice(backend, task, k, seed, batch_size):
    requests, spans = [], []
    for doc in task.docs:
        context = task.context(doc, task.shots(doc, k, seed))
        choices = task.choices(doc.data)
        spans.append((len(requests), choices))
        requests += [(context, task.target_delimiter + c) for c in choices]
    answers = backend.loglikelihood(requests, batch_size)
    per_doc, records = [], []
    for doc, (start, choices) in zip(task.docs, spans):
        logprobs = [lp for lp, _ in answers[start : start + len(choices)]]
        gold = task.gold(doc.data)
        scores = metrics.mc_scores(logprobs, choices, gold)
        per_doc.append(scores)
        records.append(
            _record(
                task,
                doc,
                k,
                prediction=metrics.argmax(logprobs),
                target=gold,
                correct=bool(scores["acc"]),
                logprobs=logprobs,
            )
        )
    return _aggregate_task(task, per_doc, MC_METRICS), records


def _chat_request(backend: Backend, task: Task, doc, shots) -> GenerationRequest:
    """The question as a conversation: each shot a user turn and its answer, then the question."""

    def ask(data: dict) -> list[dict]:
        return task.chat_messages(data) if task.chat_messages else [{"role": "user", "content": task.doc_to_text(data)}]

    messages = []
    for shot in shots:
        messages += [
            {"role": "user", "content": ask(shot.data)[-1]["content"]},
            {"role": "assistant", "content": task.shot_target(shot.data)},
        ]
    question = ask(doc.data)
    system = [m for m in question if m["role"] == "system"]
    rest = [m for m in question if m["role"] != "system"]
    return GenerationRequest(backend.chat_context(system + messages + rest), backend.end_of_turn, task.max_new_tokens)


def _run_generation(backend, task, k, seed, batch_size, chat=False):
    requests = [
        _chat_request(backend, task, doc, task.shots(doc, k, seed))
        if chat
        else GenerationRequest(task.context(doc, task.shots(doc, k, seed)), task.until, task.max_new_tokens)
        for doc in task.docs
    ]
    outputs = backend.generate_until(requests, batch_size)
    names = ["exact_match"] + (["exact_match_flexible"] if task.flexible_regex else [])
    names += ["partial_credit"] if task.partial_credit else []
    per_doc, records = [], []
    for doc, output in zip(task.docs, outputs):
        reference = task.reference(doc.data)
        strict = metrics.extract(output, task.strict_regex)
        if task.score is not None:
            scores = {"exact_match": task.score(doc.data, output)}
        else:
            scores = {"exact_match": metrics.exact_match(strict, reference, task.regexes_to_ignore, task.ignore_case)}
        lenient = strict
        if task.flexible_regex:
            lenient = metrics.extract(output, task.flexible_regex, group_select=-1)
            scores["exact_match_flexible"] = metrics.exact_match(
                lenient, reference, task.regexes_to_ignore, task.ignore_case
            )
        if task.partial_credit:
            scores["partial_credit"] = metrics.partial_credit(lenient, reference)
        per_doc.append(scores)
        records.append(
            _record(
                task,
                doc,
                k,
                prediction=strict,
                target=reference,
                correct=bool(scores["exact_match"]),
                output=output,
                scores=scores,
            )
        )
    return _aggregate_task(task, per_doc, names), records


def _run_perplexity(backend, task, batch_size):
    texts = [doc.data["text"] for doc in task.docs]
    logprobs = backend.loglikelihood_rolling(texts, batch_size)
    words = [len(re.split(r"\s+", t)) for t in texts]  # lm-eval's word count (wikitext)
    octets = [len(t.encode("utf-8")) for t in texts]
    items = list(zip(logprobs, words, octets))
    statistics = {
        "word_perplexity": lambda xs: metrics.weighted_perplexity([(lp, w) for lp, w, _ in xs]),
        "byte_perplexity": lambda xs: metrics.weighted_perplexity([(lp, b) for lp, _, b in xs]),
        "bits_per_byte": lambda xs: metrics.bits_per_byte([(lp, b) for lp, _, b in xs]),
    }
    result: dict[str, Any] = {}
    for name, statistic in statistics.items():
        result[name] = statistic(items)
        # Not means of per-document values: the standard error comes from resampling documents.
        result[f"{name}_stderr"] = _finite(metrics.bootstrap_stderr(statistic, items, iters=200))
    result["n"] = len(items)
    records = [_record(task, doc, 0, logprob=lp, words=w, bytes=b) for doc, (lp, w, b) in zip(task.docs, items)]
    return result, records


def _aggregate_task(task: Task, per_doc: list[dict[str, float]], names: Sequence[str]) -> dict[str, Any]:
    """Means and standard errors over the task's documents (``per_doc`` in ``task.docs`` order), and
    per subject too for a task that reports subjects."""
    result = _aggregate(per_doc, names)
    if task.per_subject:
        subjects: dict[str, list[dict]] = {}
        for doc, scores in zip(task.docs, per_doc):
            subjects.setdefault(doc.subject, []).append(scores)
        result["subjects"] = {name: _aggregate(s, names) for name, s in sorted(subjects.items())}
    return result


def _aggregate(per_doc: list[dict[str, float]], names: Sequence[str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in names:
        values = [s[name] for s in per_doc]
        result[name] = metrics.mean(values) if values else None
        result[f"{name}_stderr"] = _finite(metrics.mean_stderr(values)) if values else None
    result["n"] = len(per_doc)
    return result


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined standard error (n < 2) is null."""
    return None if math.isnan(value) else value


def _versions() -> dict[str, str]:
    import torch

    import gptlab

    return {"gptlab": gptlab.__version__, "torch": torch.__version__}


# --------------------------------------------------------------------------- output


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> None:
    write_json_atomic(path, {k: v for k, v in results.items() if k != "samples"})


def write_samples(path: str | os.PathLike, samples: Sequence[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def format_table(results: dict[str, Any]) -> str:
    """The results as a fixed-width table: one line per task, shot count and metric."""
    lines = [f"{'task':<28} {'shots':>5}  {'metric':<22} {'value':>9} {'stderr':>9} {'n':>6}"]
    shots = results["config"]["shots"]
    for task, entry in results["results"].items():
        nested = len(shots) > 1 and all(key.endswith("-shot") for key in entry)
        for label, scores in entry.items() if nested else [(f"{shots[0]}-shot", entry)]:
            k = "-" if "word_perplexity" in scores else label[: -len("-shot")]
            lines += _table_rows(task, k, scores)
            for subject, sub in scores.get("subjects", {}).items():
                lines += _table_rows(f"  {subject}", k, sub, only=("acc",))
    return "\n".join(lines)


def _table_rows(name: str, k: str, scores: dict[str, Any], only: Sequence[str] | None = None) -> list[str]:
    rows = []
    for metric, value in scores.items():
        if metric.endswith("_stderr") or metric in ("n", "truncated", "seam_merges", "subjects"):
            continue
        if only is not None and metric not in only:
            continue
        stderr = scores.get(f"{metric}_stderr")
        shown = "-" if stderr is None else f"{stderr:.4f}"
        rows.append(f"{name:<28} {k:>5}  {metric:<22} {_fmt(value):>9} {shown:>9} {scores['n']:>6}")
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
