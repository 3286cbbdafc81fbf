"""`ask`: one question's walk from text to a grounded answer (`KBLaM.ask` calls `ask` here).

1. The question is checked and wrapped in the base model's chat template (model.format_prompt).
2. The KB is attached (kblam.model): all of it, or each question's pre-filtered candidates. Where torch
   leaves a core free this runs on a second thread while the prompt's forward pass reads the layers
   below the first KB layer (kblam.second_thread).
3. The prompt's forward pass reads the KB; its KB attention gives the sources, and with the encoder's
   cosines the signals of answerability (kblam.confidence). A calibrated confidence below
   `min_confidence` refuses the question there and then. A question that names several properties
   of one entity (`named_facts`), or an open question about an entity it names (kblam.open_questions),
   is answered there too, by stating those facts whole.
4. The answer is decoded with value spans (kblam.spans): each step is the LM's token or a whole span
   quoted from the KB; `Answer.quoted` lists the triples quoted, in order. With a calibrated adapter the
   refusal is that decision's alone: an answered question never quotes the null slot's refusal.


`AnswerStream` (KBLaM.ask_stream) is the same walk in a worker thread, its text handed over as it is
generated (a span's tokens one per step, as the span decoder forces them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kblam import second_thread
from kblam import spans as span_decoding
from kblam.confidence import (
    QuestionSignals,
    entity_names,
    masked_guess,
    merge_names,
    repair_name,
    run_at,
    signals,
    words,
)
from kblam.encoder import KBEmbeddings
from kblam.kb import KnowledgeBase, Triple
from kblam.open_questions import open_facts
from kblam.prefilter import KBPrefilter
from kblam.store import KBStore, load_kb


@dataclass
class Answer:
    """A generated answer, the triples it drew on and quoted, and how sure the model is of it.

    sources: triples by their share of the KB attention paid by the question's tokens, best first.
    quoted: the triples whose text the answer quotes, in order (kblam.spans).
    confidence: the calibrated probability that the answer states a fact the KB holds (None when the
    adapter has no calibration or no KB was given); 1.0 for an open question ("Tell me about gold.")
    answered with the facts of the entity it names word for word (kblam.open_questions).
    refused: the answer is the refusal.
    signals: the measured signals the confidence was computed from (kblam.confidence).
    """

    question: str
    text: str
    sources: list[tuple[Triple, float]] = field(default_factory=list)
    quoted: list[Triple] = field(default_factory=list)
    confidence: float | None = None
    refused: bool = False
    signals: dict[str, float] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        return self.text


def clean_question(question) -> str:
    """The question as text the tokenizer accepts: lone surrogates (undecodable bytes) become U+FFFD."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"ask() needs non-empty question strings, got {question!r:.80}")
    return question.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if _has_surrogates(question) \
        else question


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def resolve_kb(model, kb):
    """A KB as ask() reads it: a KBStore, KBEmbeddings or KnowledgeBase (files and folders opened, lists
    de-duplicated). The model's cache (kblam.kb_cache) keeps each one's adapter states per version."""
    if kb is None or isinstance(kb, (KBStore, KBEmbeddings, KnowledgeBase)):
        return kb
    if isinstance(kb, (str, Path)):
        path = Path(kb)
        kb = load_kb(path)  # a folder: one shared read-only KBStore per folder (kblam.store); else a KB file
        return kb
    if isinstance(kb, Sequence) and not isinstance(kb, (bytes, str)):
        if not all(isinstance(t, Triple) for t in kb):
            raise TypeError("kb must be a KnowledgeBase, KBStore, KBEmbeddings, a list of Triples or a file path")
        return KnowledgeBase(list(kb))  # merges exact duplicates
    raise TypeError(
        f"kb must be a KnowledgeBase, KBStore, KBEmbeddings, a list of Triples or a file path, not {type(kb).__name__}"
    )


def ask(
    model,
    question: str | Sequence[str],
    kb=None,
    *,
    max_new_tokens: int = 48,
    max_sources: int = 5,
    min_confidence: float | None = None,
    spans: bool | None = None,
    prefilter: bool | KBPrefilter | None = None,
    prefilter_above: int | None = None,
    prefilter_k: int | None = None,
    repair_names: bool = True,
    **generate_kwargs,
) -> Answer | list[Answer]:
    """Answer one question (-> Answer) or a list (-> list[Answer], generated as one batch). See KBLaM.ask."""
    single = isinstance(question, str)
    questions = [clean_question(q) for q in ([question] if single else list(question))]
    if not questions:
        raise ValueError("ask() needs a non-empty question string, or a list of them")
    if not isinstance(max_sources, int) or max_sources < 0:
        raise ValueError(f"max_sources must be a non-negative int, got {max_sources!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    calibrator = getattr(model, "calibrator", None)
    if min_confidence is None:
        min_confidence = calibrator.threshold if calibrator is not None else 0.0
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    cfg = model.config
    can_quote = bool(cfg.span_kinds or cfg.copy_values)
    spans = can_quote if spans is None else spans
    if spans and not can_quote:
        raise ValueError("this adapter cannot quote spans (it has neither span_kinds nor copy_values)")
    if not spans and cfg.span_kinds:
        raise ValueError("this adapter was trained to quote spans: spans=False has no token-level copy path")

    kb = resolve_kb(model, kb)
    narrow, index = False, None
    if kb is not None:
        kb = model.kb_states(kb)  # this version of the KB, for the whole answer (kblam.kb_cache)
        above = model.prefilter_above if prefilter_above is None else prefilter_above
        narrow = prefilter if isinstance(prefilter, bool) else (
            prefilter is not None or (above is not None and len(kb) > above))
        index = prefilter if isinstance(prefilter, KBPrefilter) else None
        _encode_properties(model, kb)
    asking = _Asking(questions, single, kb, narrow, index, prefilter_k or model.prefilter_k, repair_names, spans,
                     max_new_tokens, max_sources, min_confidence, calibrator)
    if kb is not None and second_thread.wanted(getattr(model, "second_thread", None)):
        try:
            return _answer(model, asking, dict(generate_kwargs), early=True)
        except second_thread.Restart as restart:  # a repaired name: the prompt read ahead was not the one to answer
            return _answer(model, asking, dict(generate_kwargs), found=restart.found)
    return _answer(model, asking, generate_kwargs)


@dataclass
class _Asking:
    """One call of ask, checked: what _answer reads."""

    questions: list[str]
    single: bool
    kb: object  # the KB version read (kblam.kb_cache.KBStates), or None
    narrow: bool  # pre-filtered to each question's k candidates
    index: KBPrefilter | None
    k: int
    repair_names: bool
    spans: bool
    max_new_tokens: int
    max_sources: int
    min_confidence: float
    calibrator: object


def _retrieved(model, a: _Asking) -> tuple[list[str], list[bool], torch.Tensor | None]:
    """(questions as read, which were repaired, what the retrieval found): see _repaired."""
    if a.kb is None or not a.repair_names:
        return a.questions, [False] * len(a.questions), None
    return _repaired(model, a.kb, a.questions, a.narrow, a.index, a.k)


def _reading(model, a: _Asking, asked: list[str], recorder, found: torch.Tensor | None):
    """(the KB as the forward passes read it, source_of(question row, column) -> Triple or None)."""
    if a.narrow:
        return model._candidates_attachment(a.kb, asked, recorder, a.k, a.index, tap=a.spans, copy=not a.spans,
                                            rows=found)
    attached = model._kb_attachment(a.kb, recorder, questions=asked, chunk_size=None, tap=a.spans,
                                    copy=not a.spans, cosine=found)
    triples, m = a.kb.triples, len(a.kb)
    return attached, lambda i, j: triples[j] if j < m else None


def _ahead(model, a: _Asking, recorder):
    """The worker's part of an answer read ahead: the retrieval, then the KB to read (or Restart)."""
    asked, repaired, found = _retrieved(model, a)
    if any(repaired):
        raise second_thread.Restart((asked, repaired, found))
    attached, source_of = _reading(model, a, asked, recorder, found)
    return attached, source_of


def _answer(model, a: _Asking, generate_kwargs: dict, *, early: bool = False, found=None):
    """ask's walk once the KB version is known. early: the KB is prepared on the worker (kblam.second_thread) while
    the prompt is read; found: the retrieval of an answer that restarted (the repaired questions)."""
    questions, kb = a.questions, a.kb
    if early:
        asked, repaired = questions, [False] * len(questions)  # else the worker raises Restart
    else:
        asked, repaired, found = found or _retrieved(model, a)

    tok = model.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    prompts = [model.format_prompt(q) for q in asked]
    inputs = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False,
                 return_offsets_mapping=bool(getattr(tok, "is_fast", False)))
    offsets = inputs.pop("offset_mapping", None)
    _check_length(model, inputs["input_ids"].shape[1], a.max_new_tokens)
    from kblam.model import KBAttentionRecorder, question_token_mask

    device = next(model.base.parameters()).device
    recorder = KBAttentionRecorder(question_token_mask(prompts, asked, offsets, inputs["attention_mask"]).to(device))
    inputs = inputs.to(device)
    generate_kwargs.setdefault("do_sample", False)
    if not generate_kwargs["do_sample"]:
        for knob in ("temperature", "top_p", "top_k"):  # greedy: drop a generation_config's sampling knobs
            generate_kwargs.setdefault(knob, None)
    generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)

    context, source_of, kb_size, pending = nullcontext(), None, 0, None
    if kb is not None:
        kb_size = len(kb)
        if early:
            # A KB version's first use (its projection, or its pre-filter's index: seconds, and the largest
            # temporaries) stays on this thread; the worker keeps to what each question costs, and what it
            # allocates sits in its own allocator arena (docs/performance.md: the first question's peak).
            model._prefiltered(kb, a.index) if a.narrow else model.kb_layers(kb)
            # The tokenizer is not shared with the worker (a fast tokenizer is not safe across threads).
            pending = second_thread.start(lambda: _ahead(model, a, recorder))
            context = model._attaching(pending)
            source_of = lambda i, j: pending.extra()(i, j)  # noqa: E731 - read after the prompt's pass
            if generate_kwargs.get("streamer") is not None:
                generate_kwargs["streamer"] = second_thread.HeldPrompt(generate_kwargs["streamer"])
        else:
            attached, source_of = _reading(model, a, asked, recorder, found)
            context = model._attaching(attached)
    try:
        return _generated(model, a, generate_kwargs, asked, repaired, inputs, recorder, context, source_of, kb_size)
    finally:
        if pending is not None:
            pending.settle()


def _generated(model, a: _Asking, generate_kwargs: dict, asked, repaired, inputs, recorder, context, source_of,
               kb_size: int):
    """The prompt's forward pass and the decoding, with the KB read through `context`; the Answers."""
    questions, kb, spans, cfg, tok, calibrator = a.questions, a.kb, a.spans, model.config, model.tokenizer, a.calibrator
    min_confidence, max_sources = a.min_confidence, a.max_sources
    measured: list[dict[str, float]] = []
    confidences: list[float | None] = [None] * len(questions)

    refused_now = [False] * len(questions)
    stated: dict[int, list[Triple]] = {}  # rows answered by stating the facts the question names

    def on_prefill(input_ids: torch.Tensor) -> torch.Tensor:
        """After the prompt's forward pass: signals, confidence, which rows to refuse now, and which
        name several facts of one entity (stated whole, in the question's order: no generation)."""
        stop = torch.zeros(len(questions), dtype=torch.bool)
        if source_of is None:
            return stop
        measured.extend(_signals(model, recorder, asked, source_of, kb_size, repaired))
        shares = recorder.scores()
        if calibrator is not None:
            for i, c in enumerate(calibrator.confidence(measured)):
                confidences[i] = c
                refused_now[i] = c < min_confidence
        for i, q in enumerate(asked):
            triple_of = lambda j, i=i: source_of(i, j)  # noqa: E731
            # An open question about an entity the question names word for word states that entity's
            # facts, the KB's own text: nothing is left to doubt, so it is never refused on confidence.
            opened = open_facts(q, shares[i], triple_of) if spans else []
            if opened:
                stated[i], refused_now[i] = opened, False
                if confidences[i] is not None:
                    confidences[i] = 1.0
            elif spans and not refused_now[i] and len(named := named_facts(q, shares[i], triple_of)) >= 2:
                stated[i] = named
            stop[i] = refused_now[i] or i in stated
        return stop

    budget = a.max_new_tokens
    longest = _longest_span(kb, cfg) if spans and kb is not None else 0
    decoder = span_decoding.SpanDecoder(
        model, inputs["input_ids"].shape[1], source_of or (lambda i, j: None), budget=budget, spans=spans,
        on_prefill=on_prefill, sample=bool(generate_kwargs["do_sample"]), block_null=calibrator is not None,
    )
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    processors.insert(0, decoder)
    with context:
        if not spans and cfg.copy_values and kb is not None:
            from kblam.model import CopyProcessor

            processors.insert(0, CopyProcessor(model, inputs["input_ids"].shape[1]))
        output = span_decoding.generate(model, decoder, inputs, budget + longest + 1, processors, **generate_kwargs)
    texts = tok.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    scores = recorder.scores() if source_of is not None else None
    answers = []
    for i, (q, text) in enumerate(zip(questions, texts, strict=True)):
        sources = []
        if scores is not None and max_sources:
            best = torch.topk(scores[i], k=min(max_sources, scores.shape[-1]))
            for s, j in zip(best.values.tolist(), best.indices.tolist(), strict=True):
                triple = source_of(i, j)
                if triple is not None:
                    sources.append((triple, s))
        quoted, refused = [], refused_now[i]
        if i in stated:
            text, quoted = state_facts(stated[i], cfg.refusal), list(stated[i])
        for column, _kind in decoder.quotes[i] if decoder.quotes and i not in stated else []:
            triple = source_of(i, column)
            if triple is None:
                refused = True  # the null slot's span is the refusal
            else:
                quoted.append(triple)
        if refused:
            text, quoted = cfg.refusal, []
        text = text.strip()
        refused = refused or (cfg.refusal in text and not quoted)
        answers.append(Answer(question=q, text=text, sources=sources, quoted=quoted, confidence=confidences[i],
                              refused=refused, signals=measured[i] if i < len(measured) else {}))
    return answers[0] if a.single else answers


class AnswerStream:
    """One answer's text as it is generated (iterate over it), then the whole Answer (`.answer`).

        stream = model.ask_stream("What is the symbol of gold?", kb=kb)
        for piece in stream:
            print(piece, end="", flush=True)
        stream.answer.sources                      # and quoted, confidence, refused, signals

    `ask` runs in a worker thread (torch's grad mode and kblam's attached KB are per thread, so it
    attaches there) with transformers' TextIteratorStreamer, which hands over text a word at a time (a
    quoted span, read in one pass, at once).
    The pieces join to `answer.text`: leading and trailing whitespace is held back as `ask` strips it,
    and an answer refused after the prompt's forward pass streams the refusal at the end. Only when
    the answer became the refusal after other text was streamed do they differ (`answer.text` is the
    answer). Errors raise from the iteration. Leaving the loop early (or `close()`) stops generating
    at the next step.
    """

    def __init__(self, model, question: str, kb=None, **kwargs):
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        if not isinstance(question, str):
            raise TypeError("ask_stream answers one question (a str); use ask() for a batch")
        self.answer: Answer | None = None
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        stop.append(lambda input_ids, scores, **_: self._cancelled.is_set())
        kwargs.update(streamer=self._streamer, stopping_criteria=stop)
        self._thread = threading.Thread(target=self._run, args=(model, question, kb, kwargs), daemon=True)
        self._thread.start()

    def _run(self, model, question, kb, kwargs) -> None:
        try:
            with torch.no_grad():
                self.answer = ask(model, question, kb, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer's thread
            self._error = error
        finally:
            self._streamer.end()  # a second stop signal when generate ended it already: never read

    def __iter__(self) -> Iterator[str]:
        sent, held = "", ""  # text handed over, and whitespace held back
        try:
            for piece in self._streamer:
                piece = held + piece
                if not sent:
                    piece = piece.lstrip()
                text = piece.rstrip()
                held = piece[len(text):]
                if text:
                    sent += text
                    yield text
        finally:
            self.close()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self.answer.text.startswith(sent) and self.answer.text != sent:
            yield self.answer.text[len(sent):]

    def close(self) -> None:
        """Stop generating (at the next step); the worker thread then ends."""
        self._cancelled.set()


def _stems(text: str) -> list[str]:
    """Lower-case words, a plural or "-ed" ending dropped: "codes" names "code"."""
    out = []
    for word in words(text):
        for suffix, shortest in (("es", 5), ("s", 4), ("ed", 5)):
            if word.endswith(suffix) and len(word) >= shortest:
                word = word[: -len(suffix)]
                break
        out.append(word)
    return out


def named_facts(question: str, shares: torch.Tensor, triple_of) -> list[Triple]:
    """The facts of the best source's entity whose property the question names word for word, in the
    question's order ("the symbol and atomic number of iron"): a multi-fact question the answer states
    whole, one fact per property named. Among the 64 best sources (the entity's facts are among them)."""
    near = torch.topk(shares, min(64, shares.numel())).indices.tolist()
    best = triple_of(near[0]) if near else None
    if best is None:
        return []
    asked = _stems(question)
    named = []
    for j in near:
        t = triple_of(j)
        if t is None or t.name != best.name:
            continue
        stems = _stems(t.property)
        at = run_at(asked, stems)
        if at >= 0:
            named.append((at, -len(stems), t))
    named.sort(key=lambda x: (x[0], x[1]))
    out, taken = [], set()
    for start, minus_len, t in named:  # a longer property wins its words ("alpha-2 code" over "code")
        span = set(range(start, start - minus_len))
        if not span & taken and t.property not in {u.property for u in out}:
            out.append(t)
            taken |= span
    return out


def state_facts(facts: Sequence[Triple], refusal: str) -> str:
    """"The symbol of Iron is Fe, and the atomic number of Iron is 26." (the facts' own text, whole)."""
    text = ""
    for k, t in enumerate(facts):
        if k:
            text += ", and" if k == len(facts) - 1 else ","
        text += span_decoding.span_text("fact", t, text, refusal)
    return text + "."


def _check_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """A prompt that cannot fit the model's context fails at once, with the numbers."""
    limit = getattr(model.base.config, "max_position_embeddings", None)
    if limit and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"the question is too long: its prompt is {prompt_tokens} tokens and max_new_tokens is "
            f"{max_new_tokens}, over the base model's context of {limit} tokens"
        )


def _longest_span(kb, cfg) -> int:
    """An upper bound on a span's tokens (a token is at least one byte), so a started span completes.

    Kept with the KB's version (kb: KBStates) and carried over its edits (a bound still). A store gives
    a bound from its file's longest line: a million triples are not read."""
    fact = "fact" in (cfg.span_kinds or ())
    if kb.from_store:
        return max(kb.store.max_triple_bytes() + (16 if fact else 0), len(cfg.refusal.encode())) + 2
    return kb.derive("longest_span", lambda triples: _span_bound(triples, cfg), upper_bound=True)


def _span_bound(triples, cfg) -> int:
    longest = max((len(t.value.encode()) + (len(t.name.encode()) + len(t.property.encode()) + 16
                                            if "fact" in (cfg.span_kinds or ()) else 0) for t in triples), default=0)
    return max(longest, len(cfg.refusal.encode())) + 2


PROPERTIES_ENCODED_UP_TO = 1024


def _encode_properties(model, states) -> None:
    """The KB's property names through the encoder, once per KB version (its first question), when it has
    at most PROPERTIES_ENCODED_UP_TO of them: the confidence's property match reads the best entity's
    property names, and a name not yet encoded costs a question an encoder call. A store's come from its
    name index (kblam.store.names), not from reading its million triples."""
    if states.from_store:
        def encode(_) -> int:
            names = states.store.entity_names().properties
            if names is not None and len(names) <= PROPERTIES_ENCODED_UP_TO:
                model.encoder.encode(sorted(names), keep=True)
            return 0 if names is None else len(names)

        states.derive("properties_encoded", encode)
        return

    def encode(triples) -> int:
        names = sorted({t.property for t in triples})
        if len(names) <= PROPERTIES_ENCODED_UP_TO:
            model.encoder.encode(names, keep=True)
        return len(names)

    states.derive("properties_encoded", encode, merge=lambda old, new: old + new)


def _repaired(model, states, questions: list[str], narrow: bool, index, k: int
              ) -> tuple[list[str], list[bool], torch.Tensor | None]:
    """The questions as the model reads them: a one-letter typo in the name of an entity among each
    question's 64 nearest triples (by the encoder's key cosine) put right (kblam.confidence.repair_name).
    A typo moves the question's embedding away from its entity's keys, so retrieval would miss it.

    Also what the retrieval found, while it holds (no question changed), so that it is not done twice:
    with full attention the key cosines over the whole KB (model.kb_cosine: a pass over every key);
    pre-filtered, the pre-filter's k best rows per question (its search, of which the names read 64)."""
    # The question and, when it names an entity of the KB, the question without that name, which the
    # signals will read after the forward pass (kblam.confidence.masked_guess): one encoder call, not two.
    # A store's million names are not read for this: it keeps their hashes (kblam.store.names).
    names = states.store.entity_names() if states.from_store else \
        states.derive("entity_names", entity_names, merge=merge_names)
    guesses = [g for q in questions if (g := masked_guess(q, names)) is not None] if names else []
    queries = model.encoder.encode(questions + guesses)[:len(questions)]
    if narrow:
        found = torch.from_numpy(model._prefiltered(states, index)[0].search(queries.numpy(), max(k, 64))[1])
        rows = found[:, :64].tolist()
        found = found[:, :k]
    else:
        found = model.kb_cosine(states, queries)  # the keys' norms are kept with the KB version
        rows = torch.topk(found, min(64, found.shape[-1]), dim=-1).indices.tolist()
    out, repaired = [], []
    pick = getattr(states.triples, "take", None)  # a store's view reads a question's rows in one call
    for q, row in zip(questions, rows, strict=True):
        row = [j for j in row if j >= 0]
        fixed = repair_name(q, {t.name for t in (pick(row) if pick else [states.triples[j] for j in row])})
        out.append(fixed or q)
        repaired.append(fixed is not None)
    return out, repaired, None if any(repaired) else found


def _signals(model, recorder, questions: list[str], source_of, kb_size: int,
             repaired: list[bool]) -> list[dict[str, float]]:
    attached = model._attached
    shares = recorder.scores()
    null = recorder.null_share()
    cosines = attached.cosine if attached.cosine is not None else torch.zeros_like(shares)
    items = [
        QuestionSignals(question=q, shares=shares[i].cpu(), null_share=float(null[i]),
                        cosines=cosines[min(i, cosines.shape[0] - 1)].cpu(),
                        triple=lambda j, i=i: source_of(i, j), kb_size=kb_size, repaired=repaired[i])
        for i, q in enumerate(questions)
    ]
    return signals(items, model.encoder)
