"""A training run's checkpoints: save, rotate, and restore the newest one that loads.

A checkpoint is ``checkpoints/step-NNNNNNN/`` in the run folder, written atomically: the model's
own files (a Hugging Face folder, so any checkpoint loads in transformers) plus
``trainer_state/`` with the optimizer and RNG states (``state.pt``, read back with
``weights_only=True``) and the step, the optimizer's kind and the batch source's position
(``state.json``). Under FSDP the states are gathered to full, unsharded CPU tensors first, so
a checkpoint does not depend on how many ranks wrote it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.checkpoint import WEIGHTS_NAME, atomic_folder, read_config
from gptlab.errors import UserError, first_line
from gptlab.model import ModelConfig
from gptlab.runs import RunFolder
from gptlab.tokenizer import Tokenizer
from gptlab.train.protocols import BatchSource, Trainable

# Model settings a resume may change: they are not the model's shape (dropout acts only in training).
NOT_SHAPE = ("dropout",)


class _Unreadable(Exception):
    """A checkpoint part that cannot be read back: the message names the file and the reason."""


@dataclass
class _Saved:
    """What ``Checkpoints.save`` wrote, read back and checked for damage."""

    step: int
    state: dict  # state.json
    optimizer: dict
    rng: dict
    weights: dict[str, torch.Tensor]
    config: ModelConfig
    tokenizer: Tokenizer | None


class Checkpoints:
    """Saves and restores the model, the optimizer, the RNG and the batch source of one run."""

    def __init__(
        self,
        run: RunFolder,
        model: Trainable,
        optimizer,
        batches: BatchSource,
        *,
        optimizer_kind: str,
        keep: int,
        sharded: bool,
        is_main: bool,
        warn: Callable[[str], None],
        tokenizer=None,
    ):
        self.run, self.model, self.optimizer, self.batches = run, model, optimizer, batches
        self.optimizer_kind, self.keep, self.sharded, self.is_main = optimizer_kind, keep, sharded, is_main
        self.warn, self.tokenizer = warn, tokenizer

    def save(self, step: int) -> None:
        """Write the checkpoint of ``step`` (collective under FSDP; rank 0 writes) and drop all but
        the newest ``keep``."""
        model_state, optim_state = self._full_state()
        if not self.is_main:
            return
        with atomic_folder(self.run.checkpoint_dir(step)) as folder:
            snapshot = self.model.with_state(model_state) if self.sharded else self.model
            snapshot.write_files(folder, tokenizer=self.tokenizer)
            state_dir = folder / "trainer_state"
            state_dir.mkdir()
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save({"optimizer": optim_state, "rng": rng}, state_dir / "state.pt")
            trainer_state = {"step": step, "optimizer": self.optimizer_kind, "batches": self.batches.state_dict()}
            (state_dir / "state.json").write_text(json.dumps(trainer_state, indent=1))
        for old in self.run.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self) -> tuple[Path, int]:
        """Restore the newest checkpoint that loads and return (its folder, its step). A damaged one
        is skipped with a warning naming it and the reason. A UserError when the run holds no
        checkpoint, when none loads, or when the checkpoint does not fit this run (another model
        shape, tokenizer or optimizer): that is found before anything is restored."""
        found = self.run.checkpoints_to_resume()
        for index in reversed(range(len(found))):
            folder, older = found[index], found[index - 1] if index else None
            try:
                saved = self._read(folder)
                self._check_fits(folder, saved)
                self._apply(folder, saved)
            except _Unreadable as e:
                then = f"; trying the older {older.name}" if older else ""
                self.warn(f"checkpoint {folder} cannot be loaded, so it is skipped: {e}{then}")
                continue
            return folder, saved.step
        raise UserError(
            f"no checkpoint in {self.run.checkpoints_dir} can be loaded ({len(found)} tried, each damaged: see the "
            "warnings above); they are left untouched: drop --resume and train afresh into another --out"
        )

    def _read(self, folder: Path) -> _Saved:
        """Everything ``save`` wrote into ``folder``; ``_Unreadable`` naming the file and the reason
        when a part is missing, unreadable or damaged."""
        state_dir = folder / "trainer_state"
        state = _read_json_object(state_dir / "state.json")
        if not isinstance(state.get("step"), int) or state["step"] < 0 or not isinstance(state.get("batches"), dict):
            raise _Unreadable(f"{state_dir / 'state.json'} lacks the step or the data position")
        extra = _read_torch_state(state_dir / "state.pt")
        rng = extra.get("rng")
        if not isinstance(extra.get("optimizer"), dict) or not isinstance(rng, dict) or "torch" not in rng:
            raise _Unreadable(f"{state_dir / 'state.pt'} lacks the optimizer's or the random generators' state")
        try:
            config = ModelConfig.from_hf(read_config(folder)[1])
            weights = self.model.read_state(folder)
            tokenizer = Tokenizer.from_pretrained(folder) if self.tokenizer is not None else None
        except UserError as e:
            raise _Unreadable(str(e)) from None
        damaged = next((k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()), None)
        if damaged is not None:
            raise _Unreadable(f"{folder / WEIGHTS_NAME} is damaged: {damaged} holds NaN or infinite values")
        return _Saved(state["step"], state, extra["optimizer"], rng, weights, config, tokenizer)

    def _check_fits(self, folder: Path, saved: _Saved) -> None:
        """Refuse a checkpoint of another model shape, tokenizer or optimizer than this run's, naming
        what differs: loading it would fail deep in torch or train another model than the run's."""
        ours = self.model.config
        differ = [
            f"model.{name} {getattr(saved.config, name)!r} there, {getattr(ours, name)!r} here"
            for name in ModelConfig.field_names()
            if name not in NOT_SHAPE and getattr(saved.config, name) != getattr(ours, name)
        ]
        if saved.tokenizer is not None and saved.tokenizer.fingerprint != self.tokenizer.fingerprint:
            sizes = (saved.tokenizer.vocab_size, self.tokenizer.vocab_size)
            what = f"vocabulary {sizes[0]} there, {sizes[1]} here" if sizes[0] != sizes[1] else "other tokens or merges"
            differ.append(f"the tokenizer ({what})")
        if differ:
            raise UserError(
                f"checkpoint {folder} does not fit this run's config: {'; '.join(differ)}; resume without the "
                "--config or --set that change these, or drop --resume and train into another --out"
            )
        # Checkpoints from before train.optimizer existed hold AdamW's state.
        saved_with = saved.state.get("optimizer", "adamw")
        if saved_with != self.optimizer_kind:
            raise UserError(
                f"checkpoint {folder} holds {saved_with}'s state, but train.optimizer={self.optimizer_kind}; "
                f"resume with train.optimizer={saved_with}"
            )

    def _apply(self, folder: Path, saved: _Saved) -> None:
        """Load a checkpoint that fits into the model, the optimizer, the RNG and the batch source."""
        try:
            self._restore(saved.weights, saved.optimizer)
            torch.set_rng_state(saved.rng["torch"])
            if "cuda" in saved.rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved.rng["cuda"])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
            raise _Unreadable(
                f"{folder / 'trainer_state' / 'state.pt'} holds an optimizer or generator state that does not fit "
                f"this model ({first_line(e)})"
            ) from None
        try:
            self.batches.load_state_dict(saved.state["batches"])
        except (KeyError, TypeError, ValueError) as e:
            raise _Unreadable(
                f"{folder / 'trainer_state' / 'state.json'} holds a damaged data position ({e!r})"
            ) from None

    def _full_state(self) -> tuple[dict, dict]:
        """(model state, optimizer state) as full, unsharded CPU tensors (collective under FSDP)."""
        if not self.sharded:
            return self.model.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (
            get_model_state_dict(self.model, options=options),
            get_optimizer_state_dict(self.model, self.optimizer, options=options),
        )

    def _restore(self, weights: dict, optim_state: dict) -> None:
        if not self.sharded:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(optim_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, self._keyed_by_name(optim_state), options=options)

    def _keyed_by_name(self, optim_state: dict) -> dict:
        """The optimizer state keyed by parameter name, as FSDP's loader needs. A one-process or DDP
        run saves it keyed by index in the optimizer's parameter order, which ``build_optimizer``
        makes the same in every run of the same model; names pass through."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        order = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

        def key(k):
            return order[k] if isinstance(k, int) else k

        return {
            "state": {key(k): v for k, v in optim_state["state"].items()},
            "param_groups": [{**g, "params": [key(k) for k in g["params"]]} for g in optim_state["param_groups"]],
        }


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except OSError as e:
        raise _Unreadable(f"{path} cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise _Unreadable(f"{path} is damaged: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise _Unreadable(f"{path} is damaged: not a JSON object")
    return value


def _read_torch_state(path: Path) -> dict:
    """state.pt, read with ``weights_only=True``: tensors and plain containers, never arbitrary objects.
    torch's own message for a file it refuses advises unpickling it; a user never sees that advice."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol of some damaged files
            value = torch.load(path, weights_only=True, map_location="cpu")
    except OSError as e:
        raise _Unreadable(f"{path} cannot be read ({e.strerror or e})") from None
    except Exception:  # torch.load raises many kinds (UnpicklingError, RuntimeError, EOFError, ...) on bad bytes
        raise _Unreadable(
            f"{path} is damaged: it is not a torch file of plain tensors as gptlab writes (truncated, overwritten "
            "or another program's file)"
        ) from None
    if not isinstance(value, dict):
        raise _Unreadable(f"{path} is damaged: it holds no trainer state")
    return value


def export_model(run: RunFolder) -> None:
    """Publish the newest checkpoint's model files as the run's ``model/`` (no trainer state)."""
    final = run.checkpoints()[-1]
    with atomic_folder(run.model_dir) as folder:
        for item in final.iterdir():
            if item.is_file():
                shutil.copy2(item, folder / item.name)
