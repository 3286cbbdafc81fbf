"""The embedded default (SmolLM2-135M-Instruct + all-MiniLM-L6-v2), offline. Slow: loads real models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kblam import KBLaM, KnowledgeBase, Triple
from kblam.model import UntrainedAdapterWarning

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parents[1] / "examples" / "elements.csv"


@pytest.fixture(scope="module")
def model():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedAdapterWarning)  # the shipped adapter is trained
        return KBLaM.from_pretrained()


@pytest.fixture(scope="module")
def kb():
    return KnowledgeBase.from_csv(EXAMPLE)


def test_the_shipped_adapter_is_trained_and_small(model):
    from kblam.model import SHIPPED_ADAPTER

    assert model.config.trained
    assert model.config.span_kinds and model.config.retrieval_prior and model.config.null_slot
    assert model.calibrator is not None and 0.0 < model.calibrator.threshold < 1.0  # calibrated on validation KBs
    weights = SHIPPED_ADAPTER / "kblam_adapter.safetensors"
    assert weights.stat().st_size < 5_000_000
    assert (SHIPPED_ADAPTER / "README.md").read_text().count("| 100 |") >= 1  # the card has its eval table


def test_updating_a_value_changes_the_top_source_and_the_answer(model, kb):
    """No retraining: the same question over an edited KB follows the edit."""
    question = "What is the atomic number of iron?"
    before = model.ask(question, kb=kb, max_new_tokens=16, max_sources=1)
    assert before.sources[0][0] == Triple("Iron", "atomic number", "26")
    assert "26" in before.text
    edited = KnowledgeBase(kb.triples)
    edited.update("Iron", "atomic number", "47")
    after = model.ask(question, kb=edited, max_new_tokens=16, max_sources=1)
    assert after.sources[0][0] == Triple("Iron", "atomic number", "47")
    assert "47" in after.text and "26" not in after.text


def test_a_question_the_kb_cannot_answer_is_refused(model, kb):
    answer = model.ask("What is the population of Atlantis?", kb=kb, max_new_tokens=24)
    assert answer.text == model.config.refusal and answer.refused and answer.quoted == []
    assert answer.confidence < model.calibrator.threshold


def test_the_answer_quotes_the_kb_whole_and_says_how_sure(model, kb):
    answer = model.ask("What is the atomic number of iron?", kb=kb, max_new_tokens=24)
    assert answer.quoted == [Triple("Iron", "atomic number", "26")] and not answer.refused
    assert answer.confidence > model.calibrator.threshold and "26" in answer.text


def test_default_loads_offline(model):
    assert model.config.base_model.startswith("kblam-default/SmolLM2-135M")
    assert model.config.encoder == "sentence-transformers/all-MiniLM-L6-v2"
    assert model.encoder.dim == 384
    assert model.config.num_hidden_layers == 30
    assert model.tokenizer.chat_template


def test_ask_returns_answer_with_ranked_sources(model, kb):
    answer = model.ask("What is the chemical symbol of gold?", kb=kb, max_new_tokens=8, max_sources=4)
    assert isinstance(answer.text, str) and answer.text
    assert len(answer.sources) == 4
    scores = [s for _, s in answer.sources]
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(t, Triple) and t in kb for t, _ in answer.sources)
    assert 0 < sum(scores) <= 1.0 + 1e-6


def test_batch_of_questions(model, kb):
    answers = model.ask(["Who discovered chlorine?", "What is the atomic number of iron?"], kb=kb, max_new_tokens=6)
    assert [a.question for a in answers] == ["Who discovered chlorine?", "What is the atomic number of iron?"]
    assert all(a.sources for a in answers)


def test_without_kb_the_answer_is_the_base_models(model):
    tok = model.tokenizer
    prompt = model.format_prompt("What is the capital of France?")
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    plain = model.base.generate(**inputs, max_new_tokens=8, do_sample=False, temperature=None, top_p=None, top_k=None)
    expected = tok.decode(plain[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    answer = model.ask("What is the capital of France?", max_new_tokens=8)
    assert answer.text == expected
    assert answer.sources == []


def test_attaching_a_kb_changes_the_logits(model, kb):
    inputs = model.tokenizer("The symbol of gold is", return_tensors="pt")
    with torch.no_grad():
        plain = model(**inputs).logits
        read = model(**inputs, kb=kb, questions=["What is the symbol of gold?"]).logits
    assert (plain - read).abs().max() > 1e-3


def test_empty_question_is_refused(model, kb):
    with pytest.raises(ValueError, match="non-empty question"):
        model.ask("  ", kb=kb)


def test_sources_read_the_question_tokens_only(model):
    from kblam.model import question_token_mask

    question = "What is the chemical symbol of gold?"
    prompt = model.format_prompt(question)
    assert len(prompt) > len(question) + 20  # the chat template adds a system prompt around it
    enc = model.tokenizer([prompt], return_tensors="pt", return_offsets_mapping=True, add_special_tokens=False)
    mask = question_token_mask([prompt], [question], enc["offset_mapping"], enc["attention_mask"])
    assert model.tokenizer.decode(enc["input_ids"][0][mask[0]]).strip() == question


@pytest.mark.parametrize("prefilter", [False, True])
def test_reading_ahead_answers_as_the_sequential_path(model, kb, prefilter):
    """kblam.second_thread: the KB prepared on a worker beside the prompt's first 15 layers; a typo'd name restarts."""
    questions = ["What is the atomic number of iron?", "What is the symbol of Sodiun?",
                 "What is the population of Atlantis?"]
    answers = {}
    try:
        for setting in (False, True):
            model.second_thread = setting
            answers[setting] = [model.ask(q, kb=kb, max_new_tokens=16, prefilter=prefilter) for q in questions]
    finally:
        model.second_thread = None
    assert answers[True][1].signals["name_repaired"] == 1.0
    for a, b in zip(answers[False], answers[True], strict=True):
        assert (a.text, a.quoted, a.refused) == (b.text, b.quoted, b.refused)
        assert [t for t, _ in a.sources] == [t for t, _ in b.sources]
        assert a.confidence == pytest.approx(b.confidence, abs=1e-6)
