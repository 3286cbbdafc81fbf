"""A second thread for an answer's work beside the prompt's forward pass, where torch leaves a core free.

The adapter reads the KB on its KB layers only (the shipped one: 15, 18, 21, 24 and 27 of SmolLM2's 30).

* **Retrieval ahead of the first KB layer** (`start`, `Pending`). The layers below the first KB layer need
  nothing from the KB. What a question costs before its KB can be read -- the encoder call (the retrieval
  prior's question embedding), the key cosines or the pre-filter's search, the name repair, the
  candidates' projection -- runs on a worker while the main thread reads the prompt through those layers;
  the first KB layer's hook waits for it (kblam.model reads a `Pending` as the attached KB).
  The name repair (kblam.confidence.repair_name) can change a question, hence its prompt. The worker then
  prepares nothing: the first KB layer raises `Restart`, which carries what the retrieval found, and the
  answer starts again from the repaired question on one thread (a typo'd name costs the layers read so
  far). `Restart` never escapes `ask`; a caller's streamer sees the prompt only once (`HeldPrompt`).
* **The sources' probabilities behind each KB layer** (`Jobs`). The prompt's KB attention that the
  sources and the span decoder read (the question's rows, recomputed after the fused kernel: kblam.attention)
  is nothing the next layer needs: each KB layer hands it to a worker and goes on; the forward call waits
  for the worker at its end, before anything reads it.
* **A decoding step's KB in halves.** A one-question decoding step's KB attention of more than
  kblam.few_rows.MOST_TOKENS_ALONE tokens is split between two threads inside one numba call (numba's own
  threads: they start in microseconds, where this module's workers would take about 100 us a hand-over).
  The model's setting reaches it through the attached KB (`beside`, kblam.attention.KBLayerInputs.halves).

`concurrent.futures` runs the workers; torch releases the GIL inside its operations (numba's kernels and
FAISS's search too), so the two threads overlap beyond the Python between them. `KBLaM.second_thread`:
True, False, or None (the default) for "when torch's threads leave a core of this process free".
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class Restart(Exception):  # noqa: N818 - a signal, not an error: ask catches it and answers sequentially
    """The retrieval changed a question (a repaired name): the prompt read so far is not the one to answer."""

    def __init__(self, found: Any):
        super().__init__("the retrieval repaired a question's name: read the repaired prompt")
        self.found = found


class Pending:
    """A KB being prepared on the worker; `result()` waits for it (kblam.model reads it at the first KB layer).

    The job returns (attached KB, anything else the caller reads afterwards) or raises Restart."""

    def __init__(self, future: Future):
        self._future = future

    def result(self):
        """The attached KB (waits for the worker; raises what it raised, Restart included)."""
        return self._future.result()[0]

    def extra(self):
        """What the job returned beside the attached KB (waits, as result())."""
        return self._future.result()[1]

    def settle(self) -> None:
        """Wait for the worker without raising: nothing it does outlives the answer that started it."""
        try:
            self._future.result()
        except BaseException:  # noqa: BLE001 - the answer is already failing or restarting for a reason of its own
            pass


def spare_core() -> bool:
    """Whether torch leaves a core of this process free for the worker (torch's threads < usable cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() < cores


def wanted(setting: bool | None) -> bool:
    """A model's `second_thread`: True, False, or None for "when torch leaves a core free"."""
    return spare_core() if setting is None else bool(setting)


def start(job: Callable[[], tuple[Any, Any]]) -> Pending:
    """Run `job` on the worker thread without gradients (grad mode is per thread; ask runs without them)."""
    global _pool
    with _pool_lock:
        if _pool is None:  # several answers may read ahead at once (a server's threads)
            _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="kblam-second-thread")

    def run():
        with torch.no_grad():
            return job()

    return Pending(_pool.submit(run))


class HeldPrompt:
    """A caller's streamer for an answer read ahead: generate's first put (the prompt, which a streamer
    skips) is passed on only with the next put, so that an answer restarted before its first token hands
    the streamer the repaired prompt as its first put, not the text of its answer."""

    def __init__(self, streamer):
        self.streamer, self.held, self.first = streamer, None, True

    def put(self, value) -> None:
        if self.first:
            self.first, self.held = False, value
            return
        self._release()
        self.streamer.put(value)

    def end(self) -> None:
        self._release()
        self.streamer.end()

    def _release(self) -> None:
        if self.held is not None:
            self.streamer.put(self.held)
            self.held = None


class Jobs:
    """Jobs run in order on one worker, beside the thread that puts them, until `finish`."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done = start(self._run)

    def _run(self):
        while (job := self._jobs.get()) is not None:
            job()
        return None, None

    def put(self, job: Callable[[], Any]) -> None:
        self._jobs.put(job)

    def finish(self) -> None:
        """Wait for every job put; raises the first one's error (the jobs after it are not run)."""
        self._jobs.put(None)
        self._done.extra()
