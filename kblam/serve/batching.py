"""Micro-batching: questions that arrive within a few milliseconds are answered as one generation.

One worker thread owns the model. It takes the oldest waiting request, waits `window_s` (5 ms by
default) for others, and answers every waiting question that shares its generation settings, up to
`max_batch` questions, with one `KBLaM.ask(list)` call: on a CPU a batch of 32 costs about as much
as 4 single questions (docs/serving.md has the measurement). While a batch runs, new requests queue
up and form the next one, so under load batches fill without waiting for the window.

Hand-written rather than taken from a serving framework (Ray Serve's @serve.batch, Triton): those
bring a process model and dependencies far heavier than the server itself, and this needs three
things they do not give together: one thread that owns the model (so the batch reads the reader
store of that thread, at one KB version), rows of one batch that stream their text to different
clients, and a request that fails alone when its question cannot be answered (the batch is retried
one request at a time).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from transformers import TextStreamer

from kblam.answer import Answer

log = logging.getLogger("kblam.serve")


@dataclass(frozen=True)
class AskParams:
    """What must be equal for questions to share a generation (max_sources is per request: sliced)."""

    max_new_tokens: int = 48
    min_confidence: float | None = None
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None


@dataclass
class Answered:
    answer: Answer
    kb_version: int  # the store generation the whole batch read


@dataclass
class Job:
    questions: list[str]
    params: AskParams
    max_sources: int
    on_text: Callable[[str], None] | None = None  # streamed pieces, from the worker thread (one question)
    future: Future = field(default_factory=Future)  # -> list[Answered]
    arrived: float = field(default_factory=time.monotonic)


class Overloaded(RuntimeError):
    """More questions are waiting than the server queues: the client should retry later (503)."""


# run(questions, params, max_sources, streamer) -> (answers, kb version); called in the worker thread only.
Runner = Callable[[list[str], AskParams, int, "BatchStreamer | None"], tuple[list[Answer], int]]


class MicroBatcher:
    # After a batch, wait for the clients it answered at most this share of its time, and at most SETTLE_MAX_S
    # (a 6 s batch of 32 at most 0.25 s, a 0.4 s batch of one 20 ms); no longer once as many came back.
    SETTLE_SHARE, SETTLE_MAX_S = 0.05, 0.25

    def __init__(self, run: Runner, tokenizer, *, window_s: float = 0.005, max_batch: int = 32,
                 max_queue: int = 512, on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1 or max_queue < max_batch or window_s < 0:
            raise ValueError("need max_batch >= 1, max_queue >= max_batch and window_s >= 0")
        self._run, self._tokenizer = run, tokenizer
        self.window_s, self.max_batch, self.max_queue = window_s, max_batch, max_queue
        self._on_batch = on_batch  # (questions, seconds): for the metrics
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting = 0  # questions submitted and not yet taken into a batch
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        return self._waiting

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kblam-answer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Answer what is queued, then end the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> Future:
        if not job.questions or len(job.questions) > self.max_batch:
            raise ValueError(f"a request holds 1 to {self.max_batch} questions")
        with self._lock:
            if self._waiting + len(job.questions) > self.max_queue:
                raise Overloaded(f"{self._waiting} questions are waiting, the most this server queues is "
                                 f"{self.max_queue}; retry in a few seconds")
            self._waiting += len(job.questions)
        self._queue.put(job)
        return job.future

    # --- the worker thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        pending: deque[Job] = deque()  # taken from the queue, not answered yet (other settings, or no room)
        stopping = False
        ended, answered, settle_until = 0.0, 0, 0.0  # the last batch: its end, its questions, how long to wait
        while not (stopping and not pending):
            if not pending:
                job = self._queue.get()
                if job is None:
                    break
                pending.append(job)
            # Everything that arrives within the window of the oldest request. Right after a batch, also the
            # clients it answered, who ask again within milliseconds (until as many questions came back as it
            # answered, or settle_until): without this wait those that come back last miss the next batch, and
            # under load the clients split into groups taking turns, each batch part full.
            window_end = pending[0].arrived + self.window_s
            while not stopping and self._rows(pending, pending[0].params) < self.max_batch:
                back = sum(len(j.questions) for j in pending if j.arrived >= ended)
                until = max(window_end, settle_until) if back < answered else window_end
                now = time.monotonic()
                try:
                    job = self._queue.get(timeout=until - now) if now < until else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                else:
                    pending.append(job)
            batch = self._take(pending)
            if batch:
                started = time.monotonic()
                self._answer(batch)
                ended = time.monotonic()
                answered = sum(len(j.questions) for j in batch)
                settle_until = ended + min(self.SETTLE_SHARE * (ended - started), self.SETTLE_MAX_S)

    @staticmethod
    def _rows(jobs, params: AskParams) -> int:
        return sum(len(j.questions) for j in jobs if j.params == params)

    def _take(self, pending: deque[Job]) -> list[Job]:
        """The oldest request and those behind it with the same settings, up to max_batch questions."""
        params, batch, rows, kept = pending[0].params, [], 0, deque()
        while pending:
            job = pending.popleft()
            if job.future.cancelled():  # the client went away before its turn
                self._taken(len(job.questions))
            elif job.params == params and rows + len(job.questions) <= self.max_batch:
                batch.append(job)
                rows += len(job.questions)
                self._taken(len(job.questions))
            else:
                kept.append(job)
        pending.extend(kept)
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _taken(self, n: int) -> None:
        with self._lock:
            self._waiting -= n

    def _answer(self, batch: list[Job]) -> None:
        questions = [q for job in batch for q in job.questions]
        sinks, row = {}, 0
        for job in batch:
            if job.on_text is not None:
                sinks[row] = job.on_text
            row += len(job.questions)
        streamer = BatchStreamer(self._tokenizer, sinks) if sinks else None
        started = time.monotonic()
        try:
            answers, version = self._run(questions, batch[0].params, max(j.max_sources for j in batch), streamer)
        except Exception as error:  # noqa: BLE001 - handed to the requests
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            # One request's question may be what failed (too long for the context, ...): each alone,
            # except a stream that already sent text (it cannot take it back).
            for job in batch:
                if streamer is not None and streamer.sent(job):
                    job.future.set_exception(error)
                else:
                    alone = Job(job.questions, job.params, job.max_sources, job.on_text, Future(), job.arrived)
                    alone.future.set_running_or_notify_cancel()
                    self._answer([alone])
                    _chain(alone.future, job.future)
            return
        if self._on_batch is not None:
            self._on_batch(len(questions), time.monotonic() - started)
        row = 0
        for job in batch:
            mine = answers[row:row + len(job.questions)]
            for i, answer in enumerate(mine):
                answer.sources = answer.sources[:job.max_sources]
                if streamer is not None and row + i in sinks:
                    streamer.finish(row + i, answer.text)
            row += len(job.questions)
            job.future.set_result([Answered(a, version) for a in mine])


def _chain(source: Future, target: Future) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


class _RowText(TextStreamer):
    """One batch row's text as KBLaM.ask_stream hands it over: transformers' TextStreamer cuts it at word
    ends; leading and trailing whitespace is held back as ask() strips it (kblam.answer.AnswerStream)."""

    def __init__(self, tokenizer, sink: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.sink, self.text, self._held = sink, "", ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        piece = self._held + text
        if not self.text:
            piece = piece.lstrip()
        kept = piece.rstrip()
        self._held = piece[len(kept):]
        if kept:
            self.text += kept
            self.sink(kept)


class BatchStreamer:
    """A generate() streamer for a batch: each streaming row's text goes to its own sink as it is made.

    transformers' own streamers take batch size 1; this hands each row to one of them.
    """

    def __init__(self, tokenizer, sinks: dict[int, Callable[[str], None]]):
        self._rows = {row: _RowText(tokenizer, sink) for row, sink in sinks.items()}

    def put(self, value) -> None:
        for row, text in self._rows.items():
            text.put(value[row:row + 1])  # the prompt (B, N) first, which each row skips; then (B,) per step

    def end(self) -> None:
        for text in self._rows.values():
            text.end()

    def finish(self, row: int, answer_text: str) -> None:
        """After ask() returned: what the answer holds beyond the streamed text (a refusal decided at
        the prompt, or the tail ask() kept), as AnswerStream does."""
        text = self._rows[row]
        if answer_text.startswith(text.text) and answer_text != text.text:
            text.sink(answer_text[len(text.text):])
            text.text = answer_text

    def sent(self, job: Job) -> bool:
        return any(text.sink is job.on_text and text.text for text in self._rows.values())
