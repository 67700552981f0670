"""Cross-checking against lm-evaluation-harness: the same MMLU folder (or any task written as a
config) as lm-eval tasks, run with ``lm_eval --model hf``, and its per-sample results read back.

The task files copy lm-eval's MMLU default (``tasks/mmlu/default/_default_template_yaml``):
the same ``doc_to_text``, choices " A".." D" after target delimiter " ", description, first-n
dev shots and fewshot delimiter "\\n\\n"; only the data source differs (local headerless CSVs
instead of the hub's ``cais/mmlu``). YAML is a superset of JSON, so they are written as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gptlab.data.documents import jsonl_records
from gptlab.errors import UserError

MMLU_TEXT = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:"


def write_task(out_dir: str | os.PathLike, config: dict) -> str:
    """Write one lm-eval task (or group) config into ``out_dir``; returns its name."""
    name = config["group"] if "group" in config else config["task"]  # a group's "task" lists its tasks
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"{name}.yaml").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return name


def write_mmlu_tasks(mmlu_dir: str | os.PathLike, out_dir: str | os.PathLike, group: str = "local_mmlu") -> str:
    """Write one lm-eval task per subject of an MMLU-layout folder, plus a group; returns the group name."""
    mmlu_dir = Path(mmlu_dir).resolve()
    names = []
    for test in sorted((mmlu_dir / "test").glob("*_test.csv")):
        stem = test.name[: -len("_test.csv")]
        name = f"{group}_{stem}"
        config = {
            "task": name,
            "dataset_path": "csv",
            "dataset_kwargs": {
                "data_files": {"test": str(test), "dev": str(mmlu_dir / "dev" / f"{stem}_dev.csv")},
                "column_names": ["question", "A", "B", "C", "D", "answer"],
                "keep_default_na": False,
                "na_filter": False,
            },
            "test_split": "test",
            "fewshot_split": "dev",
            "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "doc_to_text": MMLU_TEXT,
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
            "description": (
                f"The following are multiple choice questions (with answers) about {stem.replace('_', ' ')}.\n\n"
            ),
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        names.append(write_task(out_dir, config))
    aggregate = [{"metric": "acc", "weight_by_size": True}]
    return write_task(out_dir, {"group": group, "task": names, "aggregate_metric_list": aggregate})


def run_lm_eval_hf(
    model_dir: str | os.PathLike,
    tasks_dir: str | os.PathLike,
    tasks: str,
    out_dir: str | os.PathLike,
    shots: int = 5,
    batch_size: int = 32,
    device: str = "cpu",
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """``lm_eval --model hf`` on a local model folder and local tasks (names, comma-separated), offline,
    logging samples; ``env`` adds environment variables (e.g. thread counts)."""
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={Path(model_dir).resolve()},dtype=float32",
        "--tasks",
        tasks,
        "--include_path",
        str(Path(tasks_dir).resolve()),
        "--num_fewshot",
        str(shots),
        "--batch_size",
        str(batch_size),
        "--device",
        device,
        "--output_path",
        str(Path(out_dir).resolve()),
        "--log_samples",
    ]
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(Path(out_dir).resolve() / "datasets_cache"),
        **(env or {}),
    }
    return subprocess.run(command, capture_output=True, text=True, env=env)


def read_samples(out_dir: str | os.PathLike, task: str) -> dict[int, dict]:
    """{doc_id: lm-eval's sample record} of one task from its sample logs (``filtered_resps`` holds the
    answers: a generation's text, a rolling log-likelihood, (log-likelihood, is_greedy) per choice)."""
    found = {
        record["doc_id"]: record
        for path in Path(out_dir).rglob(f"samples_{task}_*.jsonl")  # samples_{task}_{timestamp}.jsonl
        for _, record in jsonl_records(path)
    }
    if not found:
        raise UserError(f"no lm-eval sample logs for {task} under {out_dir}")
    return found


def read_mmlu_samples(out_dir: str | os.PathLike, group: str) -> dict[tuple[str, int], list[float]]:
    """{(subject, doc_id): log-likelihood of each choice} from lm-eval's sample logs."""
    found: dict[tuple[str, int], list[float]] = {}
    for path in Path(out_dir).rglob(f"samples_{group}_*.jsonl"):
        stem = path.name[len(f"samples_{group}_") :].rsplit("_", 1)[0]  # samples_{task}_{timestamp}.jsonl
        for _, record in jsonl_records(path):
            found[(stem.replace("_", " "), record["doc_id"])] = [float(r[0]) for r in record["filtered_resps"]]
    if not found:
        raise UserError(f"no lm-eval sample logs for {group} under {out_dir}")
    return found
