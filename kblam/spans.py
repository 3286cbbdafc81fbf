"""Value spans: the answer quotes a triple's text whole, or the LM writes the next token.

Copying a value token by token (kblam.copying) truncates ("9." for 9.012), repeats ("GUF GUF") and
blends two values once the KB attention spreads over many triples. Here the choice is made once per
span instead. At every decoding step a small gate reads the LM's final hidden state and the KB
attention, and weighs three kinds of next move:

    p(the LM's token w)            = g_lm   * p_lm(w)
    p(the value of triple i)       = g_value * a_i       (i not quoted yet; the null slot's "value"
                                                           is the refusal sentence)
    p(the whole fact of triple i)  = g_fact  * a_i       "the {property} of {name} is {value}"

where a is the KB attention at this position (mean over KB layers and heads, renormalised over the
knowledge tokens). Greedy decoding takes the largest; a chosen span is then emitted verbatim (the model
reads it in one forward pass, `generate`), and control goes back to the LM. A triple is quoted at most
once per answer, so a value cannot repeat, and its text is the KB's own, so it cannot be truncated or
blended. The gate also sees the KB mass already spent on quoted triples: once the asked facts are
stated, the LM finishes the sentence.

The same arithmetic is the training loss (kblam.training.loss): -log g_kind - log a_i at the first
token of a span, -log g_lm - log p_lm(w) at every other answer token, nothing inside a span.

Which value a span quotes also listens to the answer's own words: the clause written just before it
("the numeric code of Costa Rica is") is encoded like a question and its cosine with each key, times
the retrieval prior's learned scale, is added to the log KB attention (`clause_prior`). The question's
prior cannot tell apart the facts of a multi-fact question; the clause naming one of them can.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from kblam.kb import Triple

KINDS = ("value", "fact")


def span_text(kind: str, triple: Triple | None, before: str, refusal: str) -> str:
    """The text a span adds after the answer text `before`: a leading space unless at a word boundary.

    triple None is the null slot: its span is the refusal. A fact that opens a sentence is capitalised.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown span kind {kind!r}; use one of {KINDS}")
    if triple is None:
        text = refusal
    elif kind == "value":
        text = triple.value
    else:
        text = f"the {triple.property} of {triple.name} is {triple.value}"
        if not before.strip() or before.rstrip()[-1] in ".!?:":
            text = text[0].upper() + text[1:]
    return text if not before or before[-1].isspace() else " " + text


def gate_features(weights: torch.Tensor, quoted: torch.Tensor, null_slot: bool) -> torch.Tensor:
    """(.., 2): KB mass on the null slot, and on triples already quoted. weights, quoted (.., M')."""
    null = weights[..., -1] if null_slot else torch.zeros_like(weights[..., 0])
    return torch.stack([null, (weights * quoted).sum(-1)], dim=-1)


def gate_log_probs(adapter, hidden: torch.Tensor, weights: torch.Tensor, quoted: torch.Tensor) -> torch.Tensor:
    """(.., 1 + K) log-probabilities of (the LM's token, a span of each of the adapter's span kinds).

    An adapter trained with the token-level copy gate (copy_values, no span_kinds) decides value
    spans with that gate: g_value is its copy probability.
    """
    cfg = adapter.config
    if cfg.span_kinds:
        features = gate_features(weights, quoted, cfg.null_slot)
        gate = adapter.span_gate
        x = torch.cat([hidden.float(), features.float()], dim=-1).to(gate.weight.dtype)
        return torch.log_softmax(gate(x).float(), dim=-1)
    if not cfg.copy_values:
        raise ValueError("this adapter has neither span kinds nor a copy gate: it cannot quote spans")
    null = weights[..., -1] if cfg.null_slot else torch.zeros_like(weights[..., 0])
    features = torch.stack([torch.zeros_like(null), null], dim=-1)  # no copy in progress, ever
    gate = adapter.copy_gate
    logit = gate(torch.cat([hidden.float(), features.float()], dim=-1).to(gate.weight.dtype)).float()
    return torch.cat([torch.nn.functional.logsigmoid(-logit), torch.nn.functional.logsigmoid(logit)], dim=-1)


def adapter_kinds(config) -> tuple[str, ...]:
    return tuple(config.span_kinds) if config.span_kinds else ("value",)


def candidate_weights(weights: torch.Tensor, quoted: torch.Tensor, kinds: Sequence[str], null_slot: bool,
                      block_null: bool = False):
    """(.., K, M'): the KB attention each kind may quote: unquoted triples; the null slot for values only
    (never with block_null: the calibrated decision has already said to answer)."""
    free = weights * ~quoted
    rows = []
    for kind in kinds:
        if null_slot and (kind != "value" or block_null):
            rows.append(torch.cat([free[..., :-1], torch.zeros_like(free[..., -1:])], dim=-1))
        else:
            rows.append(free)
    return torch.stack(rows, dim=-2)


_CLAUSE_END = re.compile(r"[.;:!?]|,\s*|\band\b")


def last_clause(text: str) -> str | None:
    """The words since the last clause boundary, if there are at least three ("the capital of X is")."""
    clause = _CLAUSE_END.split(text)[-1].strip()
    return clause if len(clause.split()) >= 3 else None


def clause_prior(model, clause: str, keys: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """(M,): the retrieval prior's scale x cosine of the clause's encoder embedding with each key (M, d).
    `norms` (M,): the keys' norms when kept (kblam.kb_cache.key_norms): the keys are not normalised again."""
    from kblam.model import question_key_cosine

    cosine = question_key_cosine(model.encoder.encode([clause]), keys, norms)[0]
    scale = model.adapter.prior_scale if model.config.retrieval_prior else torch.tensor(20.0)
    return scale.detach().to(cosine) * cosine


_TOKEN_MASKS: dict[tuple[int, str], torch.Tensor] = {}
_TOKEN_TEXTS: dict[int, list[str]] = {}


def _token_mask(tokenizer, vocab: int, kind: str, holds) -> torch.Tensor:
    """(vocab,) bool: the tokens whose decoded text `holds(text)`. Computed once per tokenizer and kind,
    from each token's text decoded once per tokenizer, in one batch (a decode call per token cost 0.18 s a
    mask for SmolLM2's 49,152 tokens, on the first answer of every process)."""
    key = (id(tokenizer), kind)
    if key not in _TOKEN_MASKS or _TOKEN_MASKS[key].shape[0] != vocab:
        if id(tokenizer) not in _TOKEN_TEXTS:
            _TOKEN_TEXTS[id(tokenizer)] = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        texts = _TOKEN_TEXTS[id(tokenizer)][:vocab]
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[:len(texts)] = torch.tensor([bool(holds(text)) for text in texts], dtype=torch.bool)
        _TOKEN_MASKS[key] = mask
    return _TOKEN_MASKS[key]


def glue_tokens(tokenizer, vocab: int) -> torch.Tensor:
    """(vocab,) bool: tokens that begin with a letter or digit, which would fuse onto a span just emitted
    ("Nd" + "E")."""
    return _token_mask(tokenizer, vocab, "glue", lambda text: bool(text) and text[0].isalnum())


def number_tail_tokens(tokenizer, vocab: int) -> torch.Tensor:
    """(vocab,) bool: tokens that would carry on a number: a digit first, or "." or "," then a digit."""
    return _token_mask(tokenizer, vocab, "number", lambda text: bool(text) and (
        text[0].isdigit() or (text[0] in ".," and text[1:2].isdigit())))


def separator_tokens(tokenizer, vocab: int) -> torch.Tensor:
    """(vocab,) bool: the tokens "." and "," alone, which may stand between a number and its decimals."""
    return _token_mask(tokenizer, vocab, "separator", lambda text: text in (".", ","))


def line_break_tokens(tokenizer, vocab: int) -> torch.Tensor:
    """(vocab,) bool: tokens that hold a line break."""
    return _token_mask(tokenizer, vocab, "break", lambda text: "\n" in text)


class SpanDecoder:
    """A transformers logits processor that makes each step either the LM's token or a whole span.

    `triples(row, column)` gives the triple of a knowledge-token column (None for the null slot).
    `on_prefill(input_ids) -> (B,) bool` is called once, after the prompt's forward pass, and names
    rows to refuse without generating (the calibrated decision in kblam.answer); they end at once.
    With `block_null` (that decision was made) the rows it answers never quote the null slot's refusal.
    Rows stop at `budget` new tokens, except that a span under way always completes. Right after a
    span, the LM may not glue letters or digits onto it: the value reads exactly as the KB holds it. Nor
    may it carry on a number a span ends with, through "." or "," and digits ("0" then ".15").
    Once a triple is quoted, a line break ends the answer (its probability goes to end of text): the
    answers are one paragraph, and what follows a break is a new, unasked statement ("14,022\n\nThe
    employee count of ... is 435."; "R33485940\nR33485941\n...").
    After generation, `quotes[row]` lists the (column, kind) quoted, in order.
    """

    def __init__(self, model, prompt_length: int, triples: Callable[[int, int], Triple | None], *,
                 budget: int, spans: bool = True, on_prefill=None, sample: bool = False, block_null: bool = False):
        self.model, self.prompt_length, self.triples = model, prompt_length, triples
        self.block_null = block_null
        self.budget, self.spans, self.on_prefill, self.sample = budget, spans, on_prefill, sample
        self.kinds = adapter_kinds(model.config)
        tok = model.tokenizer
        eos = model.base.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = sorted({*eos, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
        self.queue: list[list[int]] = []
        self.quotes: list[list[tuple[int, str]]] = []
        self.refused: torch.Tensor | None = None
        self.quoted: torch.Tensor | None = None
        self.done: list[bool] = []
        self.after_span: list[bool] = []
        self.pads: list[int] = []  # per row, the padding `generate` inserted (not the row's tokens)
        self.ends_in_digit: list[bool] = []  # per row: the last span chosen ends with a digit
        self.after_number: list[bool] = []  # per row: one free token since such a span ended

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        b, step = input_ids.shape[0], input_ids.shape[1] - self.prompt_length
        scores = torch.log_softmax(scores.float(), dim=-1)
        kb = self.model._attached
        if step == 0:
            self.queue = [[] for _ in range(b)]
            self.quotes = [[] for _ in range(b)]
            self.done = [False] * b
            self.after_span = [False] * b
            self.pads = [0] * b
            self.ends_in_digit = [False] * b
            self.after_number = [False] * b
            width = 0 if kb is None or kb.tap is None else kb.tap.shape[-1]
            self.quoted = torch.zeros(b, width, dtype=torch.bool, device=scores.device)
            refuse = self.on_prefill(input_ids) if self.on_prefill is not None else torch.zeros(b, dtype=torch.bool)
            self.refused = refuse.cpu()
        else:
            for row in range(b):
                self.done[row] = self.done[row] or int(input_ids[row, -1]) in self.eos
        forced: dict[int, int] = {}
        for row in range(b):
            if self.done[row] or self.refused[row]:
                forced[row] = self.eos[0]
            elif self.queue[row]:
                forced[row] = self.queue[row].pop(0)
                self.after_span[row] = not self.queue[row]
                continue
            elif step - self.pads[row] >= self.budget:
                forced[row] = self.eos[0]
        glued = [row for row in range(b) if row not in forced and self.after_span[row]]
        if glued:
            scores[glued] = scores[glued].masked_fill(glue_tokens(self.model.tokenizer, scores.shape[-1]).to(
                scores.device), float("-inf"))
        # A number a span ends with stays the KB's: neither ".15" right after it, nor "15" after its ".".
        # (after_number is only ever set for a row whose span ends with a digit.)
        if any(self.ends_in_digit):
            tail = number_tail_tokens(self.model.tokenizer, scores.shape[-1]).to(scores.device)
            separator = separator_tokens(self.model.tokenizer, scores.shape[-1])
            for row in range(b):
                if row in forced:
                    continue
                carried = (self.after_span[row] and self.ends_in_digit[row]) or (
                    self.after_number[row] and bool(separator[int(input_ids[row, -1])]))
                self.after_number[row] = self.after_span[row] and self.ends_in_digit[row]
                if carried:
                    scores[row] = scores[row].masked_fill(tail, float("-inf"))
        for row in glued:
            self.after_span[row] = False
        # A row that quoted the null slot has its refusal and end of text queued, so it is never free
        # again: a free row with a quote has quoted a triple.
        stated = [row for row in range(b) if row not in forced and self.quotes[row]]
        if stated:
            breaks = line_break_tokens(self.model.tokenizer, scores.shape[-1]).to(scores.device)
            eos, rows = self.eos[0], scores[stated]
            moved = torch.logsumexp(torch.cat([rows[:, breaks], rows[:, eos:eos + 1]], -1), -1)
            rows = rows.masked_fill(breaks, float("-inf"))
            rows[:, eos] = moved
            scores[stated] = rows
        free = [row for row in range(b) if row not in forced]
        if free and self.spans and kb is not None and kb.tap is not None:
            forced.update(self._choose(input_ids, scores, free, kb))
        for row, token in forced.items():
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores

    def _choose(self, input_ids, scores, rows: list[int], kb) -> dict[int, int]:
        """Span or LM token for each row in `rows`; returns {row: first token of its span}."""
        model, cfg = self.model, self.model.config
        index = torch.tensor(rows, device=scores.device)
        weights = kb.weights()[index, -1].float()  # (R, M')
        quoted = self.quoted[index]
        gate = gate_log_probs(model.adapter, model._lm_input[index, -1], weights, quoted)  # (R, 1 + K)
        spans = candidate_weights(weights, quoted, self.kinds, cfg.null_slot, self.block_null)  # (R, K, M')
        span_score = gate[:, 1:, None] + torch.log(spans.clamp_min(1e-30))  # (R, K, M')
        span_score = span_score.masked_fill(spans <= 0, float("-inf"))
        if self.sample:
            lm_mass = gate[:, 0].exp()
            span_mass = (gate[:, 1:, None].exp() * spans).flatten(1)  # (R, K*M')
            total = lm_mass + span_mass.sum(-1)
            takes_span = torch.rand(len(rows), device=scores.device) * total > lm_mass
            pick = torch.multinomial(span_mass.clamp_min(0) + 1e-30, 1)[:, 0]
        else:
            best_lm = gate[:, 0] + scores[index].max(-1).values
            flat = span_score.flatten(1)
            best_span, pick = flat.max(-1)
            takes_span = best_span > best_lm
        chosen = {}
        width = spans.shape[-1]
        for r, row in enumerate(rows):
            if not takes_span[r]:
                continue
            kind, column = self.kinds[int(pick[r]) // width], int(pick[r]) % width
            before = self.model.tokenizer.decode(input_ids[row, self.prompt_length:], skip_special_tokens=True)
            refusing = cfg.null_slot and column == width - 1
            if kind == "value" and not refusing and not self.sample and kb.key_embeddings is not None:
                column = self._by_clause(before, spans[r, self.kinds.index("value")], kb, row, column)
            triple = self.triples(row, column)
            if triple is None and not (cfg.null_slot and column == width - 1):
                continue  # a padding column: never quoted
            text = span_text(kind, triple, before, cfg.refusal)
            ids = self.model.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                continue
            if triple is None:
                ids = ids + [self.eos[0]]  # the refusal is the whole answer
            self.quoted[row, column] = True
            self.quotes[row].append((column, kind))
            self.queue[row] = list(ids[1:])
            self.after_span[row] = len(ids) == 1
            self.ends_in_digit[row] = text[-1:].isdigit()
            self.after_number[row] = False
            chosen[row] = ids[0]
        return chosen

    def ended(self, row: int, last: int) -> bool:
        """Whether `row` has ended: refused after the prompt, or its end of text written (`last`: its last
        token, which the next call would see)."""
        return self.done[row] or bool(self.refused[row]) or last in self.eos

    def take_queued(self, row: int) -> list[int]:
        """The rest of the span under way in `row` (which the caller appends itself), emptying its queue."""
        rest, self.queue[row] = self.queue[row], []
        if rest:
            self.after_span[row] = True
        return rest

    def _by_clause(self, before: str, weights: torch.Tensor, kb, row: int, column: int) -> int:
        """The value span's column: log KB attention plus the prior of the clause just written (if any)."""
        clause = last_clause(before)
        if clause is None:
            return column
        shared = kb.key_embeddings.dim() == 2
        keys = kb.key_embeddings if shared else kb.key_embeddings[row]
        m = keys.shape[0]
        triples = weights[:m]
        norms = kb.key_norms if shared else None
        # keys as they are: float16 ones (or KeptRows) are read 512 rows at a time, the float32 cosines bit for bit
        score = torch.log(triples.clamp_min(1e-30)) + clause_prior(self.model, clause, keys, norms)
        score = score.masked_fill(triples <= 0, float("-inf"))
        return int(score.argmax()) if torch.isfinite(score.max()) else column


# False: spans are read a token a pass, as transformers' generate alone does (the reference the tests compare with).
READ_SPANS_WHOLE = True


def generate(model, decoder: SpanDecoder, inputs, max_new_tokens: int, processors, **kwargs) -> torch.Tensor:
    """model.base.generate with `decoder` among `processors`; each span it chooses is read by the model in
    one forward pass instead of one pass per token.

    A span's tokens are known once it is chosen, and every step inside it is forced, so its tokens need
    the model only for the cache of what follows. Generation stops once every unfinished row has a span
    under way (`_SpanChosen`), each row's rest is appended and transformers' generate resumes from the
    cache: it reads the appended tokens in one pass and the decoder sees the next free step as it would
    have (a value of 12 tokens: one pass of about a decoding step's time, not 12). In a batch the rests
    differ in length: the shorter ones are padded on their left, masked out like a prompt's padding (the
    positions come from the mask), so every row's last token is its own. A row writing its own words
    while others quote keeps the batch at one pass a token until it too quotes or ends. The answer is
    the same up to the rounding of a k-token product against k one-token ones.
    """
    ids = inputs["input_ids"]
    whole = (READ_SPANS_WHOLE and decoder.spans and kwargs.get("num_beams", 1) in (None, 1)
             and kwargs.get("past_key_values") is None and not kwargs.get("return_dict_in_generate"))
    if not whole:
        return model.base.generate(**inputs, max_new_tokens=max_new_tokens, logits_processor=processors, **kwargs)
    from transformers import DynamicCache, StoppingCriteriaList

    b, prompt = ids.shape
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    pad = kwargs.get("pad_token_id")
    pad = decoder.eos[0] if pad is None else pad
    min_new = kwargs.pop("min_new_tokens", None) or 0
    streamer = kwargs.pop("streamer", None)
    stop = _SpanChosen(decoder, StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or []))
    cache = DynamicCache(config=model.base.config)
    resumed = False
    while True:
        fewest = ids.shape[1] - prompt - max(decoder.pads, default=0)  # the fewest new tokens a row has
        limit = max(max_new_tokens - fewest, 1)
        out = model.base.generate(
            input_ids=ids, attention_mask=mask, past_key_values=cache,
            max_new_tokens=limit, min_new_tokens=max(min_new - fewest, 0) or None,
            logits_processor=processors, stopping_criteria=StoppingCriteriaList([stop]),
            streamer=None if streamer is None else _Resumed(streamer, resumed), **kwargs)
        rests = [[] if row in stop.finished else decoder.take_queued(row) for row in range(b)]
        if not any(rests) or stop.stopped or out.shape[1] - ids.shape[1] >= limit:
            break
        k = max(len(rest) for rest in rests)
        chunk = torch.tensor([[pad] * (k - len(rest)) + rest for rest in rests], dtype=out.dtype, device=out.device)
        # A finished row's padding is not masked, as generate pads a finished row (and a masked last
        # position would read to generate as a right-padded prompt).
        chunk_mask = torch.tensor([[int(not rest)] * (k - len(rest)) + [1] * len(rest) for rest in rests],
                                  dtype=mask.dtype, device=mask.device)
        mask = torch.cat([mask, mask.new_ones(b, out.shape[1] - mask.shape[1]), chunk_mask], dim=1)
        ids, resumed = torch.cat([out, chunk], dim=1), True
        for row, rest in enumerate(rests):
            decoder.pads[row] += k - len(rest)
            if row in stop.finished:
                decoder.done[row] = True  # stopped by the caller's criteria: it stays stopped
        if streamer is not None:  # (batch, tokens), as generate hands over a prompt; a step's is (batch,)
            streamer.put(chunk)
        if all(decoder.ended(row, int(ids[row, -1])) for row in range(b)):
            out = ids  # the refusal, which ends an answer: nothing is left to generate
            break
    if streamer is not None:
        streamer.end()
    return out


class _SpanChosen:
    """Stops generation once every unfinished row has a span's tokens queued (or the caller's criteria stop
    every row: `stopped` then says so, and nothing resumes; the rows they stop are `finished`)."""

    def __init__(self, decoder: SpanDecoder, criteria):
        self.decoder, self.criteria, self.stopped = decoder, criteria, False
        self.finished: set[int] = set()

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.criteria:
            done = done | self.criteria(input_ids, scores, **kwargs)
            self.finished.update(done.nonzero()[:, 0].tolist())
        self.stopped = bool(done.all())
        d = self.decoder
        waiting = [row for row in range(input_ids.shape[0])
                   if row not in self.finished and not d.ended(row, int(input_ids[row, -1]))]
        if waiting and all(d.queue[row] for row in waiting):
            return torch.ones_like(done)
        return done


class _Resumed:
    """The caller's streamer across generate calls: a resumed call's first put (the text so far) is not
    streamed again, and only the last call ends the stream."""

    def __init__(self, streamer, resumed: bool):
        self.streamer, self.skip = streamer, resumed

    def put(self, value):
        if self.skip:
            self.skip = False
        else:
            self.streamer.put(value)

    def end(self):
        pass
