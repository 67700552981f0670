"""One thread per model owns its ``Scheduler`` (which is not thread-safe) and steps it.

The event loop hands it work through an inbox (add, cancel) and gets each step's outputs back on
the request's asyncio queue through ``loop.call_soon_threadsafe``, one call per step. The thread
sleeps on a condition while there is nothing to add and nothing running. A cancelled sequence is
cancelled before the next step, so its slot is free after that step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict

from gptlab.engine import Engine
from gptlab.engine.batching import Output, Request, Scheduler
from gptlab.errors import UserError
from gptlab.serve.metrics import Metrics

log = logging.getLogger("gptlab.serve")


class Sequence:
    """One sequence of a request as the event loop sees it. Its outputs, or the exception that
    ended it, arrive on ``queue`` as ``(sequence, output_or_exception)`` (shared by the request's
    sequences). Everything but ``seq_id`` is read and written on the event loop's thread."""

    def __init__(self, worker: ModelWorker, request: Request, queue: asyncio.Queue, index: int, arrived: float):
        self.worker, self.request, self.queue, self.index = worker, request, queue, index
        self.loop = asyncio.get_running_loop()
        self.seq_id: int | None = None  # the scheduler's id, set on the worker thread
        self.arrived = arrived  # time.monotonic() when the request came in
        self.last_token: float | None = None
        self.finished = False


class ModelWorker:
    """The scheduler thread of one model."""

    def __init__(self, name: str, engine: Engine, max_batch: int, max_queue: int, metrics: Metrics):
        self.name, self.engine, self.metrics = name, engine, metrics
        self.max_batch, self.capacity = max_batch, max_batch + max_queue
        self.scheduler = Scheduler(engine, max_batch=max_batch)
        self.active = 0  # admitted sequences not finished yet (event-loop side)
        self._inbox: list[tuple[str, Sequence]] = []
        self._wake = threading.Condition()
        self._live: dict[int, Sequence] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ----- the event loop's side

    def admit(self, sequences: list[Sequence]) -> bool:
        """Queue the sequences unless the model's slots and queue are full (then nothing is queued)."""
        if self.active + len(sequences) > self.capacity:
            return False
        self.active += len(sequences)
        for sequence in sequences:
            self.metrics.add("gptlab_prompt_tokens_total", len(sequence.request.prompt), model=self.name)
        self._post([("add", s) for s in sequences])
        return True

    def cancel(self, sequences: list[Sequence]) -> None:
        """Cancel the sequences not finished yet; their slots are free after the next step."""
        self._post([("cancel", s) for s in sequences if not s.finished])

    def start(self) -> None:
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"gptlab-scheduler-{self.name}", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def _post(self, items: list[tuple[str, Sequence]]) -> None:
        if not items:
            return
        self.start()
        with self._wake:
            self._inbox += items
            self._wake.notify()

    # ----- the scheduler thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self.scheduler.has_work() and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                work, self._inbox = self._inbox, []
            delivered = [self._apply(action, sequence) for action, sequence in work]
            delivered = [d for d in delivered if d is not None]
            if self.scheduler.has_work():
                delivered += self._step()
            self.metrics.set("gptlab_running_sequences", self.scheduler.running, model=self.name)
            self.metrics.set("gptlab_waiting_sequences", self.scheduler.waiting, model=self.name)
            _hand_over(delivered)

    def _apply(self, action: str, sequence: Sequence) -> tuple[Sequence, Output | Exception] | None:
        if action == "cancel":
            if sequence.seq_id in self._live:
                self.scheduler.cancel(sequence.seq_id)
            return None
        try:
            sequence.seq_id = self.scheduler.add(sequence.request)
        except UserError as e:  # the server checks requests first, so this is a limit it did not know
            return sequence, e
        self._live[sequence.seq_id] = sequence
        return None

    def _step(self) -> list[tuple[Sequence, Output | Exception]]:
        try:
            outputs = self.scheduler.step()
        except Exception as e:  # a bug: fail the live sequences, keep serving with a fresh scheduler
            log.exception(
                "the scheduler of model %s failed; its %d sequences end with an error", self.name, len(self._live)
            )
            failed = [(s, e) for s in self._live.values()]
            self._live.clear()
            self.scheduler = Scheduler(self.engine, max_batch=self.max_batch)
            return failed
        delivered = []
        for output in outputs:
            sequence = self._live.get(output.seq_id)
            if sequence is None:
                continue
            if output.finish_reason is not None:
                del self._live[output.seq_id]
            delivered.append((sequence, output))
        return delivered


def _hand_over(delivered: list[tuple[Sequence, Output | Exception]]) -> None:
    """Give each event loop its outputs in one call (the server has one loop; tests may have more)."""
    by_loop = defaultdict(list)
    for sequence, item in delivered:
        by_loop[sequence.loop].append((sequence, item))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
            loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[Sequence, Output | Exception]]) -> None:
    """On the event loop: count, time and queue each output; a finished sequence leaves its worker."""
    now = time.monotonic()
    for sequence, item in items:
        worker = sequence.worker
        name, metrics = worker.name, worker.metrics
        done = isinstance(item, Exception) or item.finish_reason is not None
        if isinstance(item, Output) and item.token_ids:
            metrics.add("gptlab_generation_tokens_total", len(item.token_ids), model=name)
            if sequence.last_token is None:
                metrics.observe("gptlab_time_to_first_token_seconds", now - sequence.arrived, model=name)
            else:
                metrics.observe("gptlab_time_per_output_token_seconds", now - sequence.last_token, model=name)
            sequence.last_token = now
        if done and not sequence.finished:
            sequence.finished = True
            worker.active -= 1
            reason = item.finish_reason if isinstance(item, Output) else "error"
            metrics.add("gptlab_sequences_finished_total", model=name, finish_reason=reason)
        sequence.queue.put_nowait((sequence, item))
