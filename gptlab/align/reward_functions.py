"""The rewards GRPO optimizes: functions called as TRL calls its reward functions,
``f(prompts, completions, **columns) -> list[float | None]``, one value per completion.

``prompts`` are as the prompts file gives them (a string or a list of messages); ``completions``
the sampled answers: the text for a text prompt, ``[{"role": "assistant", "content": text}]`` for
a conversation. The keyword arguments are the prompt records' other fields (TinyWorld's
``family``, a GSM8K ``answer``), one value per completion, and ``completion_ids``. ``None`` means
the function does not apply to that completion; it counts as 0 in the weighted sum (TRL's nansum).

A reward is named in the config by one of:

- ``arith``: 1 when the completion's answer to an arithmetic question is right, else 0: the gold
  number is the record's ``answer`` (GSM8K's ``#### N``, or a number) or, without one, computed from
  a TinyWorld arithmetic prompt ("What is 12+35?", "Add 12 and 35.", ...); the stated number is the
  one after "answer is", else after "####", else the last integer. None for a prompt that is neither.
- ``oracle``: TinyWorld's oracle score in [0, 1] (correctness, then style; needs ``world``).
- a reward-model folder (``gptlab reward``'s ``model/``): its score of (prompt, completion).
- ``path/to/file.py:name``: the function ``name`` of that Python file.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.align.reward import RewardScorer
from gptlab.errors import UserError, first_line
from gptlab.world.families import FAMILIES, ArithFamily, template_regex

_STATED = (re.compile(r"answer is (-?[\d,]+)"), re.compile(r"#### (-?[\d,]+)"))
_INTEGER = re.compile(r"-?\d+")
_ARITH_PARSERS = [
    (template_regex(template, family.patterns), family)
    for family in FAMILIES
    if isinstance(family, ArithFamily)
    for template in family.templates
]


@dataclass
class RewardFunction:
    """A reward as the config names it (``spec``), its metric name and the callable."""

    spec: str
    name: str
    function: Callable

    def __call__(self, prompts: list, completions: list, columns: dict[str, list]) -> list[float]:
        """The function's value per completion (NaN where it returned None); a function that raises
        or returns something else than one number per completion is a UserError naming it."""
        try:
            values = self.function(prompts=prompts, completions=completions, **accepted(self.function, columns))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"reward function {self.spec} raised {type(e).__name__}: {first_line(e)}") from None
        values = list(values) if isinstance(values, (list, tuple, torch.Tensor)) else values
        if not isinstance(values, list) or len(values) != len(completions):
            raise UserError(
                f"reward function {self.spec} must return a list of {len(completions)} numbers (one per completion), "
                f"got {type(values).__name__}"
            )
        return [math.nan if value is None else number(value, self.spec) for value in values]


def number(value, spec: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not torch.is_tensor(value):
        raise UserError(f"reward function {spec} returned {value!r}, not a number or None")
    return float(value)


def accepted(function: Callable, columns: dict[str, list]) -> dict[str, list]:
    """The columns a function takes: all of them when it has ``**kwargs`` (TRL's signature), else
    those it names, so that ``def f(prompts, completions)`` works too."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return columns
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return columns
    names = {p.name for p in parameters}
    return {key: value for key, value in columns.items() if key in names}


# ----------------------------------------------------------------------------- arithmetic


def completion_text(completion) -> str:
    """The text of a completion as a reward function receives it (a string or a message list)."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def question_text(prompt) -> str:
    """A prompt's question: the string, or the last user message's content."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return prompt


def stated_number(text: str) -> int | None:
    """The number a completion gives as its answer (see the module docstring), None if none."""
    for pattern in _STATED:
        found = pattern.findall(text)
        if found:
            return _integer(found[-1])
    numbers = _INTEGER.findall(text)
    return int(numbers[-1]) if numbers else None


def gold_number(prompt, answer=None) -> int | None:
    """The right answer: from a record's ``answer`` field, else from a TinyWorld arithmetic prompt."""
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int):
        return answer
    if isinstance(answer, float) and answer.is_integer():
        return int(answer)
    if isinstance(answer, str):
        return stated_number(answer.strip())
    text = question_text(prompt).strip()
    for regex, family in _ARITH_PARSERS:
        match = regex.fullmatch(text)
        if match:
            return family.gold(None, match.groupdict())
    return None


def _integer(text: str) -> int | None:
    digits = text.replace(",", "")
    return int(digits) if re.fullmatch(r"-?\d+", digits) else None


def arith(prompts: list, completions: list, answer: list | None = None, **kwargs) -> list[float | None]:
    """1.0 for a right arithmetic answer, 0.0 for a wrong one, None where the question is not arithmetic."""
    answers = answer if answer is not None else [None] * len(prompts)
    rewards = []
    for prompt, completion, given in zip(prompts, completions, answers):
        gold = gold_number(prompt, given)
        rewards.append(None if gold is None else float(stated_number(completion_text(completion)) == gold))
    return rewards


# ----------------------------------------------------------------------------- loading


def oracle_function(world: str | None) -> Callable:
    if world is None:
        raise UserError("reward 'oracle' needs the TinyWorld folder it judges: set world=PATH (e.g. data/world)")
    from gptlab.world.oracle import Oracle

    oracle = Oracle(world)

    def oracle_score(prompts: list, completions: list, **kwargs) -> list[float]:
        return [oracle.score(prompt, completion) for prompt, completion in zip(prompts, completions)]

    return oracle_score


def reward_model_function(folder: Path, device: torch.device) -> Callable:
    scorer = RewardScorer.from_pretrained(folder, device=device)

    def reward_model(prompts: list, completions: list, **kwargs) -> list[float]:
        return scorer.score(prompts, completions)

    return reward_model


def user_function(spec: str) -> tuple[str, Callable]:
    """(name, function) of ``file.py:name``; a missing file, a file that fails to load or a missing
    function is a UserError naming it."""
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise UserError(f"reward function file {path} does not exist; give reward=path/to/file.py:function_name")
    module_spec = importlib.util.spec_from_file_location(f"gptlab_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"reward function file {path} failed to load: {type(e).__name__}: {first_line(e)}") from None
    function = getattr(module, name, None)
    if not callable(function):
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise UserError(
            f"{path} has no function {name!r} (it defines {', '.join(defined) or 'no function'}); "
            f"give reward={file}:one_of_them"
        )
    return name, function


def load_reward_functions(specs: list[str], world: str | None, device: torch.device) -> list[RewardFunction]:
    """The rewards a config names, in order, each with a distinct metric name."""
    functions = []
    for spec in specs:
        if spec == "arith":
            name, function = "arith", arith
        elif spec == "oracle":
            name, function = "oracle", oracle_function(world)
        elif re.search(r"\.py:[^/\\]+$", spec):
            name, function = user_function(spec)
        else:
            folder = Path(spec)
            if not folder.is_dir():
                raise UserError(
                    f"reward {spec!r} is neither 'arith', 'oracle', a reward-model folder nor file.py:function; "
                    "check the reward key"
                )
            # gptlab run folders export to RUN/model: the run's name says more than "model".
            name = folder.resolve().parent.name if folder.name == "model" else folder.name
            function = reward_model_function(folder, device)
        taken = {f.name for f in functions}
        unique, k = name, 2
        while unique in taken:
            unique, k = f"{name}_{k}", k + 1
        functions.append(RewardFunction(spec, unique, function))
    return functions
