"""The arena's board: the leaderboard of ``ratings.leaderboard`` as markdown, JSON, CSV or a plot.

Every table has the columns ``COLUMNS``: Bradley-Terry rating (``bt``, mean 1000), online Elo
(``elo``), the 95% bootstrap interval of the Bradley-Terry rating (``ci_low``, ``ci_high``), the
rank by upper bound (``rank_ub``: 1 + the number of models whose interval lies wholly above), and
each model's battles, wins and ties. Markdown and JSON add the win-rate matrix (row model against
column model, ties counting half); the plot shows each rating with its interval.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from gptlab.arena.battles import Battle
from gptlab.arena.ratings import leaderboard, win_matrix
from gptlab.errors import UserError
from gptlab.fileio import write_text_atomic
from gptlab.report import pyplot, save_figure

FORMATS = ("md", "json", "csv", "png")
COLUMNS = ("model", "bt", "elo", "ci_low", "ci_high", "rank_ub", "battles", "wins", "ties")
RATINGS = ("bt", "elo", "ci_low", "ci_high")  # rounded to 0.1 in tables: bootstrap noise is larger


class Board:
    """The leaderboard and win-rate matrix of some battles, and how they were computed."""

    def __init__(self, battles: Sequence[Battle], rounds: int = 100, seed: int = 0):
        if not battles:
            raise UserError("no battles to rate: play some with `gptlab arena run`, or `gptlab arena import` them")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise UserError(f"--bootstrap must be a whole number of rounds >= 1, got {rounds!r}")
        self.battles, self.rounds, self.seed = len(battles), rounds, seed
        self.rows = leaderboard(battles, rounds=rounds, seed=seed)
        self.models, self.win_rates = win_matrix(battles)

    def markdown(self) -> str:
        lines = [
            f"{self.battles} battles among {len(self.rows)} models. `bt`: Bradley-Terry rating (mean 1000), "
            f"`ci_low`..`ci_high` its 95% bootstrap interval ({self.rounds} rounds, seed {self.seed}); `elo`: "
            "online Elo (K = 4); `rank_ub`: 1 + the number of models rated above this one beyond doubt.",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "|".join("---" if c == "model" else "---:" for c in COLUMNS) + "|",
        ]
        lines += ["| " + " | ".join(_cell(row, c) for c in COLUMNS) + " |" for row in self.rows]
        lines += [
            "",
            "Win rate of the row model against the column model (ties count half; - where they never met):",
            "",
            "| | " + " | ".join(map(_escaped, self.models)) + " |",
            "|---|" + "---:|" * len(self.models),
        ]
        for model, rates in zip(self.models, self.win_rates):
            cells = ["" if m == model else "-" if r is None else f"{r:.0%}" for m, r in zip(self.models, rates)]
            lines.append(f"| {_escaped(model)} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def json(self) -> str:
        return json.dumps(
            {
                "battles": self.battles,
                "bootstrap": {"rounds": self.rounds, "seed": self.seed, "confidence": 0.95},
                "leaderboard": [{c: row[c] for c in COLUMNS} for row in self.rows],
                "win_matrix": {"models": self.models, "win_rate": self.win_rates},
            },
            indent=2,
            ensure_ascii=False,
        )

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue()

    def plot(self, path: str | os.PathLike) -> None:
        """Each model's Bradley-Terry rating with its 95% interval, the best at the top."""
        plt = pyplot()
        rows = self.rows[::-1]
        fig, ax = plt.subplots(figsize=(6, 1.2 + 0.4 * len(rows)))
        centre = [row["bt"] for row in rows]
        spread = [[row["bt"] - row["ci_low"] for row in rows], [row["ci_high"] - row["bt"] for row in rows]]
        ax.errorbar(centre, range(len(rows)), xerr=spread, fmt="o", capsize=4)
        ax.set_yticks(range(len(rows)), [row["model"] for row in rows])
        ax.set_xlabel("Bradley-Terry rating (mean 1000), 95% bootstrap interval")
        ax.set_title(f"Arena: {self.battles} battles")
        ax.grid(alpha=0.3, axis="x")
        save_figure(plt, fig, Path(path))


def _cell(row: dict, column: str) -> str:
    value = row[column]
    return f"{value:.1f}" if column in RATINGS else _escaped(str(value))


def _escaped(text: str) -> str:
    """Text for a markdown table cell: a '|' in a model's name would end the cell."""
    return text.replace("|", "\\|")


def board_format(fmt: str | None, out: str | os.PathLike | None) -> str:
    """The format asked for, else the one --out's suffix names, else markdown."""
    if fmt is None:
        suffix = Path(out).suffix.lstrip(".").lower() if out is not None else ""
        fmt = suffix if suffix in FORMATS else "md"
    if fmt not in FORMATS:
        raise UserError(f"unknown board format {fmt!r}: use {', '.join(FORMATS)}")
    if fmt == "png" and out is None:
        raise UserError("a png board is a picture: give --out FILE.png")
    return fmt


def write_board(board: Board, fmt: str, out: str | os.PathLike | None) -> str | None:
    """The board in ``fmt`` written to ``out``, or returned as text (ending in a newline) when ``out`` is None."""
    if fmt == "png":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        board.plot(out)
        return None
    text = {"md": board.markdown, "json": board.json, "csv": board.csv}[fmt]()
    text = text if text.endswith("\n") else text + "\n"
    if out is None:
        return text
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    return None
