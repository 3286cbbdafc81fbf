"""The question path (kblam.answer, kblam.spans): whole value spans, calibrated refusal, thread safety,
bad input. Tiny random models whose span gate is set by hand, so what is quoted is known."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_tokenizer, wrap

from kblam.confidence import Calibrator
from kblam.kb import KnowledgeBase, Triple
from kblam.spans import span_text

KB = [Triple("Gold", "symbol", "Au"), Triple("Iron", "symbol", "Fe"), Triple("Neon", "symbol", "Ne"),
      Triple("Gold", "number", "79")]


def span_model(hash_encoder, *, lm: float = -30.0, value: float = 0.0, fact: float = -30.0, **options):
    """A tiny model whose gate always prefers a span of the favoured kind while one is left to quote."""
    model = wrap("llama", hash_encoder, retrieval_prior=True, span_kinds=["value", "fact"], query_rank=4, **options)
    model.tokenizer = tiny_tokenizer()
    with torch.no_grad():
        model.adapter.span_gate.weight.zero_()
        model.adapter.span_gate.bias.copy_(torch.tensor([lm, value, fact]))
    return model


def test_span_text_spacing_and_capitals():
    gold = KB[0]
    assert span_text("value", gold, "", "no") == "Au"
    assert span_text("value", gold, "The symbol is", "no") == " Au"
    assert span_text("value", gold, "It is ", "no") == "Au"
    assert span_text("fact", gold, "", "no") == "The symbol of Gold is Au"
    assert span_text("fact", gold, "Yes, and", "no") == " the symbol of Gold is Au"
    assert span_text("fact", gold, "One fact.", "no") == " The symbol of Gold is Au"
    assert span_text("value", None, "", "I cannot say.") == "I cannot say."
    with pytest.raises(ValueError, match="span kind"):
        span_text("name", gold, "", "no")


def test_values_are_quoted_whole_once_each(hash_encoder):
    model = span_model(hash_encoder)
    answer = model.ask("What is the symbol of Gold?", kb=KB, max_new_tokens=12, min_confidence=0.0)
    values = [t.value for t in answer.quoted]
    assert sorted(answer.quoted, key=str) == sorted(KB, key=str)  # every triple quoted, none twice
    assert answer.text.startswith(" ".join(values))  # verbatim and whole, one space apart


def test_a_started_span_completes_past_the_token_budget(hash_encoder):
    kb = [Triple("Gold", "motto", "all that glitters is gold")]
    model = span_model(hash_encoder)
    answer = model.ask("What is the motto of Gold?", kb=kb, max_new_tokens=2, min_confidence=0.0)
    assert answer.quoted == kb and answer.text == "all that glitters is gold"


def test_nothing_is_glued_onto_a_span(hash_encoder):
    model = span_model(hash_encoder)
    for seed in range(6):  # the LM's next token after the only span, for several random LMs
        torch.manual_seed(seed)
        with torch.no_grad():
            model.base.lm_head.weight.normal_()
        answer = model.ask("What is the symbol of Gold?", kb=KB[:1], max_new_tokens=4, min_confidence=0.0)
        assert answer.text.startswith("Au") and answer.quoted == KB[:1]
        assert len(answer.text) == 2 or not answer.text[2].isalnum(), answer.text


def test_a_quoted_number_is_not_carried_on(hash_encoder, monkeypatch):
    """An LM pushed to write "." and digits after "79" (as SmolLM2 once wrote "edited 0.15 seconds" after
    the value "edited 0") may write neither ".5" nor "5" after the "." it wrote: the number stays the KB's."""
    from kblam import spans

    model = span_model(hash_encoder)
    kb = [Triple("Gold", "number", "79")]
    pushed = [model.tokenizer.convert_tokens_to_ids(c) for c in ".,0123456789"]

    def push(input_ids, scores):
        scores[:, pushed] += 40.0
        return scores

    def ask():
        return model.ask("What is the number of Gold?", kb=kb, max_new_tokens=6, min_confidence=0.0,
                         logits_processor=[push]).text

    text = ask()
    assert text.startswith("79") and text[2] in ".," and not text[3].isdigit(), text
    monkeypatch.setattr(spans, "number_tail_tokens", lambda tok, vocab: torch.zeros(vocab, dtype=torch.bool))
    assert ask()[3].isdigit()  # without the rule, the LM would carry the number on


def test_fact_spans_state_the_whole_triple(hash_encoder):
    model = span_model(hash_encoder, value=-30.0, fact=0.0)
    answer = model.ask("What is the symbol of Gold?", kb=KB[:1], max_new_tokens=4, min_confidence=0.0)
    assert answer.text == "The symbol of Gold is Au" and answer.quoted == KB[:1]


def test_an_open_question_states_the_named_entitys_facts(hash_encoder):
    model = span_model(hash_encoder, lm=30.0)  # the LM would write: the open answer is stated, not generated
    answer = model.ask("Tell me about Gold.", kb=KB, max_new_tokens=4, min_confidence=0.0)
    assert answer.text == "The symbol of Gold is Au, and the number of Gold is 79."
    assert answer.quoted == [KB[0], KB[3]] and not answer.refused


def test_a_line_break_after_a_quoted_fact_ends_the_answer(hash_encoder):
    """The LM, left alone, would write "Au\nz\nz...": a new statement after a break is never asked for."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + " .,'?-:!\n"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    model = span_model(hash_encoder, lm=-30.0)
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>")
    newline, z = vocab["\n"], vocab["z"]

    def after_break_write_z(module, args, kwargs, output):  # "\n", then "z" after every "\n"
        last = kwargs["input_ids"][:, -1]
        boost = torch.where(last == newline, z, newline)
        output.logits[torch.arange(len(last)), -1, boost] += 100.0
        return output

    hook = model.base.register_forward_hook(after_break_write_z, with_kwargs=True)
    try:
        answer = model.ask("What is the symbol of Gold?", kb=KB[:1], max_new_tokens=6, min_confidence=0.0)
        plain = model.ask("What is the symbol of Gold?", kb=None, max_new_tokens=4)
    finally:
        hook.remove()
    assert answer.text == "Au" and answer.quoted == KB[:1]
    assert plain.text == "z\nz"  # no quote, no rule: the hook's LM writes its line breaks


def test_the_lm_writes_when_the_gate_says_so(hash_encoder):
    model = span_model(hash_encoder, lm=30.0)
    answer = model.ask("What is the symbol of Gold?", kb=KB, max_new_tokens=5, min_confidence=0.0)
    assert answer.quoted == [] and not answer.refused


def test_low_confidence_refuses_without_generating(hash_encoder):
    model = span_model(hash_encoder)
    model.calibrator = Calibrator(["top_share"], [0.0], [1.0], [0.0], bias=-5.0, threshold=0.5)
    calls = []
    hook = model.base.register_forward_pre_hook(lambda *a: calls.append(1))
    answer = model.ask("What is the population of Atlantis?", kb=KB, max_new_tokens=12)
    hook.remove()
    assert answer.refused and answer.text == model.config.refusal and answer.quoted == []
    assert answer.confidence == pytest.approx(torch.sigmoid(torch.tensor(-5.0)).item())
    assert len(calls) == 1  # the prompt's forward pass decided; nothing was generated
    kept = model.ask("What is the population of Atlantis?", kb=KB, max_new_tokens=3, min_confidence=0.0)
    assert not kept.refused and kept.quoted
    model.calibrator.threshold = 0.0
    assert not model.ask("What is the population of Atlantis?", kb=KB, max_new_tokens=3).refused


def test_signals_are_measured(hash_encoder):
    model = span_model(hash_encoder, null_slot=True)
    answer = model.ask("What is the symbol of Gold?", kb=KB, max_new_tokens=2, min_confidence=0.0)
    s = answer.signals
    assert set(s) >= {"top_share", "margin", "null_share", "cosine_top", "name_match", "property_match"}
    assert 0.0 <= s["margin"] <= s["top_share"] <= s["entity_share"] + 1e-6 <= 1.0 + 1e-6
    assert 0.0 < s["null_share"] < 1.0
    if answer.sources[0][0].name == "Gold":
        assert s["name_match"] == 1.0


@pytest.mark.parametrize("ahead", [False, True])
def test_threads_each_read_their_own_kb(hash_encoder, ahead):
    model = span_model(hash_encoder)
    model.second_thread = ahead  # each asking thread's KB prepared on a worker of its own (kblam.second_thread)
    kbs = {"a": [Triple("Gold", "symbol", "Aaaa"), Triple("Iron", "symbol", "Abab")],
           "b": [Triple("Gold", "symbol", "Zzzz"), Triple("Iron", "symbol", "Zyzy")]}
    encoded = {k: model.encode_kb(v) for k, v in kbs.items()}
    errors, mixed = [], []

    def worker(key: str):
        own = {t.value for t in kbs[key]}
        try:
            for _ in range(50):
                answer = model.ask("What is the symbol of Gold?", kb=encoded[key], max_new_tokens=3,
                                   min_confidence=0.0)
                if not answer.quoted or any(t.value not in own for t in answer.quoted) or \
                        answer.text.split()[0] not in own:
                    mixed.append(answer.text)
        except Exception as error:  # noqa: BLE001 - the test counts every failure
            errors.append(repr(error))

    threads = [threading.Thread(target=worker, args=(k,)) for k in kbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mixed == []


def test_bad_input_is_refused_clearly(hash_encoder, tmp_path):
    model = span_model(hash_encoder)
    with pytest.raises(ValueError, match="too long.*tokens"):
        model.ask("What is " + "very " * 60 + "long?", kb=KB, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_sources"):
        model.ask("What is the symbol of Gold?", kb=KB, max_sources=-1)
    with pytest.raises(ValueError, match="spans=False"):
        model.ask("What is the symbol of Gold?", kb=KB, spans=False)
    with pytest.raises(TypeError, match="kb must be"):
        model.ask("What is the symbol of Gold?", kb=42)
    with pytest.raises(ValueError, match="non-empty"):
        model.ask(["What?", "  "], kb=KB)
    # Undecodable bytes (a surrogate-escaped command-line argument) are answered, not a tokenizer crash.
    assert isinstance(model.ask("What is g\udcffold?", kb=KB, max_new_tokens=2).text, str)


def test_kb_given_as_a_path_or_a_list_with_duplicates(hash_encoder, tmp_path):
    model = span_model(hash_encoder)
    path = tmp_path / "facts.csv"
    KnowledgeBase(KB).to_csv(path) if hasattr(KnowledgeBase, "to_csv") else path.write_text(
        "name,property,value\n" + "".join(f"{t.name},{t.property},{t.value}\n" for t in KB))
    from_path = model.ask("What is the symbol of Gold?", kb=str(path), max_new_tokens=3, min_confidence=0.0)
    direct = model.ask("What is the symbol of Gold?", kb=KB, max_new_tokens=3, min_confidence=0.0)
    assert from_path.text == direct.text
    repeated = model.ask("What is the symbol of Gold?", kb=[KB[0]] * 100, max_new_tokens=3, min_confidence=0.0)
    assert [t for t, _ in repeated.sources] == [KB[0]] and repeated.sources[0][1] == pytest.approx(1.0)


def test_the_calibrated_decision_alone_refuses(hash_encoder):
    """With the null slot drawing most KB attention, the span path quotes the refusal; once a calibrated
    decision has said to answer, it quotes a triple instead."""
    model = span_model(hash_encoder, null_slot=True)
    with torch.no_grad():
        model.adapter.null_bias.fill_(30.0)
    alone = model.ask("What is the symbol of Gold?", kb=KB, max_new_tokens=6)
    assert alone.refused and alone.text == model.config.refusal and alone.confidence is None
    model.calibrator = Calibrator(["top_share"], [0.0], [1.0], [0.0], bias=5.0, threshold=0.5)
    decided = model.ask("What is the symbol of Gold?", kb=KB, max_new_tokens=6)
    assert not decided.refused and decided.quoted and decided.confidence > 0.99


def test_a_question_naming_several_facts_states_each_whole():
    from kblam.answer import named_facts, state_facts

    kb = [Triple("Iron", "symbol", "Fe"), Triple("Iron", "atomic number", "26"), Triple("Iron", "number", "x"),
          Triple("Gold", "symbol", "Au"), Triple("Iron", "category", "transition metal")]
    shares = torch.tensor([0.3, 0.3, 0.1, 0.2, 0.1])
    named = named_facts("What are the atomic numbers and symbols of iron?", shares, lambda j: kb[j])
    assert named == [kb[1], kb[0]]  # the question's order; "atomic number" wins "number"; Gold's symbol is not Iron's
    assert state_facts(named, "no") == "The atomic number of Iron is 26, and the symbol of Iron is Fe."
    assert named_facts("What is the symbol of iron?", shares, lambda j: kb[j]) == [kb[0]]  # one fact: not a list
