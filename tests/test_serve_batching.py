"""The micro-batcher (kblam.serve.batching) with a stand-in model: who is batched with whom."""

from __future__ import annotations

import threading
import time

import pytest

from kblam.answer import Answer
from kblam.serve.batching import AskParams, Job, MicroBatcher, Overloaded


class Recorder:
    """Answers each question with its own text; records every batch; can block, fail, or count calls."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on

    def __call__(self, questions, params, max_sources, streamer):
        self.gate.wait(10)
        self.batches.append(list(questions))
        if self.fail_on in questions:
            raise ValueError(f"cannot answer {self.fail_on!r}")
        return [Answer(question=q, text=f"answer to {q}") for q in questions], len(self.batches)


def batcher(run, **kw) -> MicroBatcher:
    b = MicroBatcher(run, tokenizer=None, **kw)
    b.start()
    return b


def test_questions_within_the_window_are_one_batch():
    run = Recorder()
    b = batcher(run, window_s=0.2, max_batch=8)
    futures = [b.submit(Job([f"q{i}"], AskParams(), 5)) for i in range(5)]
    answers = [f.result(10) for f in futures]
    b.stop()
    assert run.batches == [[f"q{i}" for i in range(5)]]
    assert [a[0].answer.text for a in answers] == [f"answer to q{i}" for i in range(5)]
    assert {a[0].kb_version for a in answers} == {1}


def test_batches_respect_settings_and_size_and_keep_order():
    run = Recorder()
    run.gate.clear()  # the first batch blocks while the rest queue up behind it
    b = batcher(run, window_s=0.0, max_batch=4)
    first = b.submit(Job(["first"], AskParams(), 5))
    time.sleep(0.1)
    long = AskParams(max_new_tokens=99)
    jobs = [b.submit(Job([f"a{i}"], AskParams(), 5)) for i in range(5)]
    jobs += [b.submit(Job(["b0", "b1"], long, 5))]
    jobs += [b.submit(Job([f"a{i}"], AskParams(), 5)) for i in range(5, 7)]
    assert b.waiting == 9
    run.gate.set()
    for f in [first, *jobs]:
        f.result(10)
    b.stop()
    assert run.batches == [["first"], ["a0", "a1", "a2", "a3"], ["a4", "a5", "a6"], ["b0", "b1"]]
    assert b.waiting == 0


def test_a_failing_question_fails_its_own_request_only():
    run = Recorder(fail_on="bad")
    b = batcher(run, window_s=0.2, max_batch=8)
    good, bad, other = (b.submit(Job([q], AskParams(), 5)) for q in ("good", "bad", "other"))
    assert good.result(10)[0].answer.text == "answer to good"
    assert other.result(10)[0].answer.text == "answer to other"
    with pytest.raises(ValueError, match="cannot answer 'bad'"):
        bad.result(10)
    b.stop()
    assert run.batches[0] == ["good", "bad", "other"] and ["good"] in run.batches and ["other"] in run.batches


def test_cancelled_requests_are_skipped_and_the_queue_is_bounded():
    run = Recorder()
    run.gate.clear()
    b = batcher(run, window_s=0.0, max_batch=2, max_queue=4)
    b.submit(Job(["blocking"], AskParams(), 5))
    time.sleep(0.1)
    gone = b.submit(Job(["gone"], AskParams(), 5))
    kept = b.submit(Job(["kept", "kept too"], AskParams(), 5))
    with pytest.raises(Overloaded, match="retry"):
        b.submit(Job(["one", "more"], AskParams(), 5))
    assert gone.cancel()
    run.gate.set()
    assert len(kept.result(10)) == 2
    b.stop()
    assert ["gone"] not in run.batches and all("gone" not in batch for batch in run.batches)
    with pytest.raises(ValueError, match="1 to 2 questions"):
        b.submit(Job(["a", "b", "c"], AskParams(), 5))


def test_sources_are_cut_per_request():
    from kblam.kb import Triple

    def run(questions, params, max_sources, streamer):
        triples = [(Triple("n", "p", str(i)), 1 / (i + 1)) for i in range(max_sources)]
        return [Answer(question=q, text="t", sources=list(triples)) for q in questions], 7

    b = batcher(run, window_s=0.2)
    few, many = b.submit(Job(["a"], AskParams(), 1)), b.submit(Job(["b"], AskParams(), 4))
    assert len(few.result(10)[0].answer.sources) == 1 and len(many.result(10)[0].answer.sources) == 4
    b.stop()


def test_clients_answered_by_a_batch_join_the_next_one():
    """Four clients that ask again 15 to 24 ms after each answer (spread wider than the 5 ms window, as HTTP
    responses reach them one after another) stay in one batch instead of splitting into turns."""

    def run(questions, params, max_sources, streamer):
        time.sleep(0.5)
        sizes.append(len(questions))
        return [Answer(question=q, text="t") for q in questions], 1

    sizes: list[int] = []
    b = batcher(run, window_s=0.005, max_batch=8)

    start = threading.Barrier(4)

    def client(i):
        start.wait()
        for _ in range(3):
            b.submit(Job([f"q{i}"], AskParams(), 5)).result(10)
            time.sleep(0.015 + 0.003 * i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.stop()
    # [4, 4, 4]; or, when the first questions came more than the 5 ms window apart (a loaded machine),
    # [2, 4, 4, 2]: the groups merge. Without the wait: [4, 2, 2, 2, 2], turns that never merge.
    assert sum(sizes) == 12 and len(sizes) <= 4 and sizes.count(4) >= 2, sizes
