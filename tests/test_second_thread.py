"""Retrieval ahead (kblam.second_thread): the KB prepared on a worker thread while the prompt's first layers run gives
the answers of the sequential path; a repaired name restarts; errors and streams come through whole."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_tokenizer, wrap

from kblam import answer as answer_module
from kblam import second_thread
from kblam.kb import Triple

NAMES = ["Gold", "Iron", "Neon", "Argon", "Boron", "Carbon", "Helium", "Sodium", "Copper", "Zinc"]
KB = [Triple(name, prop, f"{name[:2]}{prop[:1]}{n}") for n, name in enumerate(NAMES)
      for prop in ("symbol", "number", "colour")]


def span_model(hash_encoder):
    """A tiny model with every part an answer reads (retrieval prior, null slot, spans), kb layers 1 and 3:
    layer 0 runs before the KB is needed."""
    model = wrap("llama", hash_encoder, retrieval_prior=True, null_slot=True, span_kinds=["value", "fact"],
                 query_rank=4, kb_layers=[1, 3])
    model.tokenizer = tiny_tokenizer()
    with torch.no_grad():
        model.adapter.span_gate.bias.copy_(torch.tensor([-2.0, 1.0, -1.0]))
    return model


def _same(a, b) -> None:
    assert a.text == b.text and a.quoted == b.quoted and a.refused == b.refused
    assert [t for t, _ in a.sources] == [t for t, _ in b.sources]
    assert [s for _, s in a.sources] == pytest.approx([s for _, s in b.sources], abs=1e-6)
    assert a.signals == pytest.approx(b.signals, abs=1e-6)
    assert (a.confidence is None) == (b.confidence is None)


@pytest.fixture
def counted(monkeypatch):
    """How many answers read ahead (their retrieval on another thread), how many of those restarted, and how
    many KB layers' records went to the second thread."""
    calls = {"ahead": 0, "restarted": 0, "records": 0}
    retrieval, answer, put = answer_module._ahead, answer_module._answer, second_thread.Jobs.put

    def counting_retrieval(*args):
        calls["ahead"] += threading.current_thread() is not threading.main_thread()
        return retrieval(*args)

    def counting_answer(model, asking, kwargs, *, early=False, found=None):
        calls["restarted"] += found is not None
        return answer(model, asking, kwargs, early=early, found=found)

    def counting_put(self, job):
        calls["records"] += 1
        return put(self, job)

    monkeypatch.setattr(answer_module, "_ahead", counting_retrieval)
    monkeypatch.setattr(answer_module, "_answer", counting_answer)
    monkeypatch.setattr(second_thread.Jobs, "put", counting_put)
    return calls


@pytest.mark.parametrize("prefilter", [False, True])
@pytest.mark.parametrize("batch", [False, True])
def test_reading_ahead_gives_the_sequential_answers(hash_encoder, counted, prefilter, batch):
    model = span_model(hash_encoder)
    kb = model.encode_kb(KB)
    questions = ["What is the symbol of Gold?", "What is the colour of Zinc?", "Who wrote Hamlet?"]
    asked = questions if batch else questions[0]
    options = dict(kb=kb, max_new_tokens=6, min_confidence=0.0, prefilter=prefilter, prefilter_k=8)
    model.second_thread = False
    before = model.ask(asked, **options)
    assert counted == {"ahead": 0, "restarted": 0, "records": 0}
    model.second_thread = True
    after = model.ask(asked, **options)
    assert counted == {"ahead": 1, "restarted": 0, "records": 2}  # the prompt's two KB layers
    for a, b in zip(before if batch else [before], after if batch else [after], strict=True):
        _same(a, b)
    assert model._local.attached is None  # nothing left attached on the asking thread


@pytest.mark.parametrize("prefilter", [False, True])
def test_a_repaired_name_restarts_from_the_repaired_question(hash_encoder, counted, prefilter):
    model = span_model(hash_encoder)
    kb = model.encode_kb(KB)
    options = dict(kb=kb, max_new_tokens=6, min_confidence=0.0, prefilter=prefilter, prefilter_k=8)
    model.second_thread = False
    before = model.ask("What is the symbol of Carbin?", **options)
    assert before.signals["name_repaired"] == 1.0  # the typo is put right: the prompt read is another
    model.second_thread = True
    after = model.ask("What is the symbol of Carbin?", **options)
    assert counted == {"ahead": 1, "restarted": 1, "records": 2}  # the restarted prompt's records too
    _same(before, after)


@pytest.mark.parametrize("question, restarts", [("What is the colour of Neon?", 0),
                                                ("What is the number of Sodiun?", 1)])  # a typo: the restart
def test_a_stream_streams_the_answer_only(hash_encoder, counted, question, restarts):
    model = span_model(hash_encoder)
    kb = model.encode_kb(KB)
    model.second_thread = False
    expected = model.ask(question, kb=kb, max_new_tokens=6, min_confidence=0.0)
    model.second_thread = True
    stream = model.ask_stream(question, kb=kb, max_new_tokens=6, min_confidence=0.0)
    text = "".join(stream)
    assert counted == {"ahead": 1, "restarted": restarts, "records": 2}
    assert text == expected.text and stream.answer.text == expected.text  # no prompt text streamed
    _same(stream.answer, expected)


@pytest.mark.parametrize("where", ["retrieval", "records"])
def test_a_workers_error_is_the_answers(hash_encoder, monkeypatch, where):
    """The retrieval's error (ahead of the first KB layer) or a record's (behind a KB layer) raises from ask."""
    from kblam.model import _AttachedKB

    model = span_model(hash_encoder)
    model.second_thread = True
    kb = model.encode_kb(KB)

    def failing(*args, **kwargs):
        assert threading.current_thread() is not threading.main_thread()
        raise RuntimeError(f"the {where} failed")

    with monkeypatch.context() as patch:
        patch.setattr(*(answer_module, "_repaired") if where == "retrieval" else (_AttachedKB, "record"), failing)
        with pytest.raises(RuntimeError, match=f"the {where} failed"):
            model.ask("What is the symbol of Gold?", kb=kb, max_new_tokens=4)
    assert model._local.attached is None
    assert model.ask("What is the symbol of Gold?", kb=kb, max_new_tokens=4, min_confidence=0.0).text


def test_a_failing_prompt_leaves_no_work_behind(hash_encoder, monkeypatch):
    model = span_model(hash_encoder)
    model.second_thread = True
    kb = model.encode_kb(KB)
    finished = []
    reading = answer_module._reading

    def slow_reading(*args, **kwargs):
        import time

        time.sleep(0.2)
        out = reading(*args, **kwargs)
        finished.append(True)
        return out

    def failing_generate(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(answer_module, "_reading", slow_reading)
    monkeypatch.setattr(answer_module.span_decoding, "generate", failing_generate)
    with pytest.raises(RuntimeError, match="generation failed"):
        model.ask("What is the symbol of Gold?", kb=kb, max_new_tokens=4)
    assert finished == [True]  # ask waited for its worker before raising


def test_the_default_is_a_spare_core(monkeypatch):
    monkeypatch.setattr(second_thread.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert second_thread.wanted(None) and second_thread.wanted(True) and not second_thread.wanted(False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not second_thread.wanted(None) and second_thread.wanted(True)


def test_held_prompt_passes_the_prompt_with_the_first_token():
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(("put", value))

        def end(self):
            seen.append(("end", None))

    held = second_thread.HeldPrompt(Streamer())
    held.put("prompt")
    assert seen == []  # a restart now would leave the caller's streamer untouched
    held.put("token")
    held.end()
    assert seen == [("put", "prompt"), ("put", "token"), ("end", None)]
    held = second_thread.HeldPrompt(Streamer())
    held.put("prompt")
    held.end()
    assert seen[-2:] == [("put", "prompt"), ("end", None)]


def test_a_kb_read_by_the_fused_kernel_records_on_the_second_thread(hash_encoder, counted, monkeypatch):
    """A KB of more knowledge tokens than a prompt's chunk: the fused kernel, and the recorded rows'
    second pass (kblam.attention._recorded_probs) run on the second thread."""
    from kblam import attention

    calls, inner = [], attention._fused_attention
    monkeypatch.setattr(attention, "_fused_attention", lambda *a: calls.append(1) or inner(*a))
    model = span_model(hash_encoder)
    kb = model.encode_kb(KB + [Triple(f"Entity {j}", "symbol", f"V{j}") for j in range(2500)])
    answers = []
    for setting in (False, True):
        model.second_thread = setting
        answers.append(model.ask(["What is the symbol of Gold?", "What is the colour of Iron?"], kb=kb,
                                 max_new_tokens=6, min_confidence=0.0, prefilter=False))
    assert calls and counted["records"] == 2
    for a, b in zip(*answers, strict=True):
        _same(a, b)
