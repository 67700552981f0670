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
from collections.abc import Callable
from pathlib import Path

import torch

from gptlab.checkpoint import atomic_folder
from gptlab.errors import UserError
from gptlab.runs import RunFolder
from gptlab.train.protocols import BatchSource, Trainable


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

    def restore(self) -> tuple[Path, int] | None:
        """Restore the newest checkpoint that loads and return (its folder, its step); a broken one
        is skipped with a warning. None when there is no checkpoint at all; a UserError when none
        of them loads or when one holds another optimizer's state."""
        found = self.run.checkpoints()
        for folder in reversed(found):
            try:
                state = json.loads((folder / "trainer_state" / "state.json").read_text())
                extra = torch.load(folder / "trainer_state" / "state.pt", weights_only=True, map_location="cpu")
                weights = self.model.read_state(folder)
            except (UserError, OSError, ValueError, RuntimeError, KeyError) as e:
                self.warn(f"checkpoint {folder} cannot be loaded ({str(e).splitlines()[0]}); trying an older one")
                continue
            # Checkpoints from before train.optimizer existed hold AdamW's state.
            saved_with = state.get("optimizer", "adamw")
            if saved_with != self.optimizer_kind:
                raise UserError(
                    f"checkpoint {folder} holds {saved_with}'s state, but train.optimizer={self.optimizer_kind}; "
                    f"resume with train.optimizer={saved_with}"
                )
            self._restore(weights, extra["optimizer"])
            torch.set_rng_state(extra["rng"]["torch"])
            if "cuda" in extra["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
            self.batches.load_state_dict(state["batches"])
            return folder, state["step"]
        if found:
            raise UserError(
                f"no checkpoint in {self.run.checkpoints_dir} can be loaded ({len(found)} tried, all broken); "
                "they are left untouched: train afresh into another --out folder"
            )
        return None

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


def export_model(run: RunFolder) -> None:
    """Publish the newest checkpoint's model files as the run's ``model/`` (no trainer state)."""
    final = run.checkpoints()[-1]
    with atomic_folder(run.model_dir) as folder:
        for item in final.iterdir():
            if item.is_file():
                shutil.copy2(item, folder / item.name)
