"""Issue 10: KBLaM.ask_stream hands an answer's text over as it is generated, then the whole Answer."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import FAMILIES, tiny_tokenizer, wrap

from kblam import spans as span_decoding
from kblam.confidence import Calibrator
from kblam.kb import Triple

KB = [Triple("Gold", "symbol", "Au"), Triple("Iron", "symbol", "Fe"), Triple("Neon", "symbol", "Ne"),
      Triple("Gold", "motto", "all that glitters")]
QUESTION = "What is the symbol of Gold?"


def _model(hash_encoder, lm: float = 0.0, value: float = 0.5, family: str = "llama"):
    model = wrap(family, hash_encoder, retrieval_prior=True, null_slot=True, span_kinds=["value", "fact"],
                 query_rank=4)
    model.tokenizer = tiny_tokenizer()
    with torch.no_grad():
        model.adapter.span_gate.weight.zero_()
        model.adapter.span_gate.bias.copy_(torch.tensor([lm, value, -1.0]))
    return model


@pytest.mark.parametrize("lm", [-30.0, 0.0, 30.0], ids=["spans", "mixed", "lm"])
def test_the_stream_is_ask_answer(lm, hash_encoder):
    model = _model(hash_encoder, lm=lm)
    for question in (QUESTION, "Tell me about Gold and Iron and Neon."):
        expected = model.ask(question, kb=KB, max_new_tokens=12, min_confidence=0.0)
        stream = model.ask_stream(question, kb=KB, max_new_tokens=12, min_confidence=0.0)
        pieces = list(stream)
        assert "".join(pieces) == stream.answer.text == expected.text
        assert stream.answer == expected  # sources, quoted, confidence, refused, signals
        if len(expected.text.split()) > 1:
            assert len(pieces) > 1


def test_text_arrives_while_generating(hash_encoder):
    """Generation waits at its third step until the reader has a piece: only a real stream gets past.
    (Each step here chooses a span, streamed whole before the model reads it in one pass.)"""
    model = _model(hash_encoder, lm=-30.0)
    got_first, waited = threading.Event(), []

    class WaitForReader:
        steps = 0

        def __call__(self, input_ids, scores):
            self.steps += 1
            if self.steps == 3:
                waited.append(got_first.wait(timeout=20))
            return scores

    stream = model.ask_stream(QUESTION, kb=KB, max_new_tokens=12, min_confidence=0.0,
                              logits_processor=[WaitForReader()])
    for _ in stream:
        got_first.set()
    assert waited == [True] and len(stream.answer.text.split()) > 2


def test_a_refusal_decided_after_the_prompt_is_streamed(hash_encoder):
    model = _model(hash_encoder)
    model.calibrator = Calibrator(["top_share"], [0.0], [1.0], [0.0], bias=-5.0, threshold=0.5)
    stream = model.ask_stream("What is the population of Atlantis?", kb=KB, max_new_tokens=12)
    assert list(stream) == [model.config.refusal] and stream.answer.refused


def test_closing_stops_generating(hash_encoder):
    model = _model(hash_encoder, lm=30.0)
    steps, started, closed = [], threading.Event(), threading.Event()

    def step(input_ids, scores):
        steps.append(1)
        if len(steps) == 2:
            started.set()
            closed.wait(timeout=20)
        return scores

    stream = model.ask_stream(QUESTION, kb=KB, max_new_tokens=200, min_new_tokens=200, min_confidence=0.0,
                              logits_processor=[step])
    assert started.wait(timeout=20)
    stream.close()  # what leaving the loop early does
    closed.set()
    stream._thread.join(timeout=20)
    assert not stream._thread.is_alive() and len(steps) <= 3


def test_errors_raise_from_the_iteration(hash_encoder):
    model = _model(hash_encoder)
    with pytest.raises(ValueError, match="max_sources"):
        list(model.ask_stream(QUESTION, kb=KB, max_sources=-1))
    with pytest.raises(TypeError, match="one question"):
        model.ask_stream([QUESTION], kb=KB)


ASKED = [QUESTION, "Tell me about Gold and Iron and Neon.", "What is the motto of Gold?"]


def _ask_counting(model, monkeypatch, asked, whole: bool, **kwargs):
    """model.ask with spans read whole (kblam.spans.generate) or a token a pass; returns (answers, passes)."""
    monkeypatch.setattr(span_decoding, "READ_SPANS_WHOLE", whole)
    passes = []
    hook = model.base.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        got = model.ask(asked, kb=KB, **{"max_new_tokens": 12, "min_confidence": 0.0, **kwargs})
    finally:
        hook.remove()
    return got, len(passes)


def _said(answers):
    return [(a.text, a.quoted, a.refused) for a in (answers if isinstance(answers, list) else [answers])]


@pytest.mark.parametrize(("family", "lm"), [*((f, -30.0) for f in FAMILIES), ("llama", 0.0)],
                         ids=[*(f"{f}-spans" for f in FAMILIES), "llama-mixed"])
def test_a_span_is_read_in_one_pass(family, lm, hash_encoder, monkeypatch):
    """Spans are read by the model in one forward pass each (kblam.spans.generate: generate resumes from
    each family's cache; in a batch of questions of different lengths, the shorter rests are padded),
    and the answers are those that token-by-token generation gives."""
    model = _model(hash_encoder, lm=lm, family=family)
    for asked in (*ASKED, ASKED):
        whole, whole_passes = _ask_counting(model, monkeypatch, asked, True)
        token, token_passes = _ask_counting(model, monkeypatch, asked, False)
        assert _said(whole) == _said(token)  # sources and signals differ in float rounding (k-token products)
        if lm < 0:  # every step quotes a value, a fact or the refusal: fewer passes
            assert whole_passes < token_passes
    for alone, row in zip(ASKED, whole, strict=True):  # a batch's rows say what each question alone says
        assert _said(row) == _said(_ask_counting(model, monkeypatch, alone, True)[0])


def test_a_caller_stop_is_not_resumed(hash_encoder):
    """A stopping criterion that ends the answer at its first step ends it there, span or not."""
    model = _model(hash_encoder, lm=-30.0)
    stop = lambda input_ids, scores, **_: torch.ones(input_ids.shape[0], dtype=torch.bool)  # noqa: E731
    one = model.ask(QUESTION, kb=KB, max_new_tokens=12, min_confidence=0.0, stopping_criteria=[stop])
    full = model.ask(QUESTION, kb=KB, max_new_tokens=12, min_confidence=0.0)
    batch = model.ask([QUESTION, QUESTION], kb=KB, max_new_tokens=12, min_confidence=0.0, stopping_criteria=[stop])
    assert one.text == batch[0].text and len(one.text) < len(full.text)


def test_a_row_stopped_by_the_caller_stays_stopped(hash_encoder, monkeypatch):
    """A criterion that stops one row of a batch at its first step: the others go on, spans read whole,
    and every row says what token-by-token generation says."""
    model = _model(hash_encoder, lm=-30.0)
    first = lambda input_ids, scores, **_: torch.arange(input_ids.shape[0]) == 0  # noqa: E731
    whole, _ = _ask_counting(model, monkeypatch, ASKED, True, stopping_criteria=[first])
    token, _ = _ask_counting(model, monkeypatch, ASKED, False, stopping_criteria=[first])
    assert _said(whole)[1:] == _said(token)[1:] and whole[0].text == token[0].text
    # The stopped row quotes what it began to (generate alone leaves the decoder quoting on in the dark).
    assert len(whole[0].text) < len(whole[1].text) and len(whole[0].quoted) == 1


@pytest.mark.parametrize("budget", [1, 3])
@pytest.mark.parametrize("lm", [-30.0, 0.0], ids=["spans", "mixed"])
def test_a_batch_read_whole_keeps_the_token_budget(budget, lm, hash_encoder, monkeypatch):
    """Short budgets (a span under way always completes) and a forced minimum length: the padded rows'
    budgets count their own tokens, so the answers are those of token-by-token generation."""
    model = _model(hash_encoder, lm=lm)
    for extra in ({}, {"min_new_tokens": budget}):
        said = [_said(_ask_counting(model, monkeypatch, ASKED, whole, max_new_tokens=budget, **extra)[0])
                for whole in (True, False)]
        assert said[0] == said[1]
