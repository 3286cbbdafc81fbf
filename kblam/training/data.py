"""Training data: episodes of (a KB drawn from a pool of synthetic triples, questions over it).

Each example carries its own KB (16 to 64 triples by default, always holding the triples its answer
uses), as in the paper. The pool's key/value texts and all questions are encoded once and cached on
disk next to the run, so a resumed run or a second recipe does not pay for the encoder again.
The examples are a `datasets.Dataset`; a batch is assembled by `collate`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from kblam.kb import Triple


@dataclass
class TrainingData:
    pool: list[Triple]
    examples: object  # datasets.Dataset: question, answer, kind, kb (pool indices), sources (positions in kb)
    key_emb: torch.Tensor  # (P, d)
    value_emb: torch.Tensor  # (P, d)
    question_emb: torch.Tensor  # (E, d), row i for example i
    value_ids: torch.Tensor  # (P, L) value tokens for the copy path
    refusal_ids: torch.Tensor  # (1, L)


def build_examples(
    n_entities: int, n_examples: int, *, seed: int, split: str, kb_size: tuple[int, int],
    mix: dict[str, float], heldout_phrasings: bool = False, per_episode: int = 4,
    whole_entities: float = 0.0, variants: bool = False, answers: str = "echo",
):
    """(pool of triples, list of example dicts) for one split.

    A share `whole_entities` of the episodes holds whole entities (each of their properties, less one
    in four, which become "the entity lacks this property" unknowns), as real KBs do; the others a
    random sample of triples. `variants`: questions also with synonyms, lower case, typos. `answers`:
    "echo" (words echoing the question around value spans) or "facts" (whole facts quoted).
    """
    from kb_builders.questions import make_examples
    from kb_builders.synthetic import synthetic_triples

    pool = synthetic_triples(n_entities, seed=seed, split=split)
    index = {t: i for i, t in enumerate(pool)}
    by_name: dict[str, list[int]] = {}
    for i, t in enumerate(pool):
        by_name.setdefault(t.name, []).append(i)
    rng = random.Random(seed)
    examples = []
    episode = 0
    while len(examples) < n_examples:
        size = rng.randint(*kb_size)
        if rng.random() < whole_entities:
            members = []
            for name in rng.sample(list(by_name), len(by_name)):
                members += [i for i in by_name[name] if rng.random() >= 0.25]
                if len(members) >= size:
                    break
            members = members[:size]
        else:
            members = rng.sample(range(len(pool)), min(size, len(pool)))
        kb = [pool[i] for i in members]
        in_kb = set(members)
        # Unanswerable questions ask both about entities the KB lacks and about missing properties of
        # entities it has (the harder kind: the name matches a key, the property does not).
        siblings = [j for i in members for j in by_name[pool[i].name] if j not in in_kb]
        strangers = [i for i in rng.sample(range(len(pool)), min(64, len(pool))) if i not in in_kb]
        absent = [pool[i] for i in rng.sample(siblings, min(32, len(siblings))) + strangers[:32]]
        # Each example draws its kind from the mix (make_examples rounds per call: 10% of 4 would be 0).
        kinds = rng.choices(list(mix), weights=list(mix.values()), k=per_episode)
        for j, kind in enumerate(kinds):
            for qa in make_examples(
                kb, 1, seed=(seed * 1_000_003 + episode) * 8 + j, mix={kind: 1.0},
                heldout_phrasings=heldout_phrasings, absent=absent, variants=variants, answers=answers,
            ):
                examples.append({
                    "question": qa.question, "answer": qa.answer, "kind": qa.kind,
                    "kb": [index[t] for t in kb], "sources": list(qa.sources),
                })
        episode += 1
    rng.shuffle(examples)
    return pool, examples[:n_examples]


def _cached_encode(encoder, texts: list[str], cache: Path | None, what: str) -> torch.Tensor:
    if cache is not None:
        digest = hashlib.sha256(("\n".join(texts) + encoder.name).encode()).hexdigest()[:16]
        path = cache / f"{what}-{digest}.pt"
        if path.is_file():
            return torch.load(path)
    vectors = encoder.encode(texts, keep=True)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(vectors, tmp)
        tmp.replace(path)
    return vectors


def prepare(model, pool: list[Triple], examples: list[dict], cache: Path | None = None) -> TrainingData:
    """Encode the pool and the questions (cached) and tokenise the values once."""
    import datasets

    from kblam import copying

    cfg = model.config
    keys = _cached_encode(model.encoder, [t.key_text(cfg.key_template) for t in pool], cache, "keys")
    values = _cached_encode(model.encoder, [t.value_text(cfg.value_template) for t in pool], cache, "values")
    questions = _cached_encode(model.encoder, [e["question"] for e in examples], cache, "questions")
    value_ids = copying.value_token_ids(
        model.tokenizer, [t.value_text(cfg.value_template) for t in pool], cfg.max_value_tokens
    )
    refusal = copying.value_token_ids(model.tokenizer, [cfg.refusal], cfg.max_value_tokens, leading_space=False)
    return TrainingData(pool, datasets.Dataset.from_list(examples), keys, values, questions, value_ids, refusal)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right padded
    attention_mask: torch.Tensor
    answer_start: torch.Tensor  # (B,) index of the first answer token
    answer_length: torch.Tensor  # (B,) answer tokens, the end-of-turn token included
    keys: torch.Tensor  # (B, M, d)
    values: torch.Tensor
    kb_mask: torch.Tensor  # (B, M)
    queries: torch.Tensor  # (B, d)
    value_ids: torch.Tensor | None  # (B, M', L) (M' = M + 1 with the null slot), for the copy path
    gold: torch.Tensor  # (B,) KB column of the asked triple (M for the null slot), -1 when none applies
    kinds: list[str]
    # Span targets (kblam.spans), per answer token (B, A): 0 for the LM's token, 1 + k for the first
    # token of a span of kind k; its KB column; whether the token lies inside a span (no loss); and
    # (B, A, M') the columns already quoted before it.
    span_kind: torch.Tensor | None = None
    span_column: torch.Tensor | None = None
    inside_span: torch.Tensor | None = None
    quoted: torch.Tensor | None = None

    def to(self, device) -> Batch:
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()}
        return Batch(**moved)


def span_tokens(tok, answer: str, facts: list[Triple], columns: list[int], null_column: int, refusal: str,
                kinds: tuple[str, ...]):
    """An answer with span markers as token ids, with per token (kind index, column, inside a span).

    Spans are tokenised exactly as kblam.spans emits them (span_text after the text so far).
    """
    from kb_builders.questions import segments
    from kblam.spans import span_text

    ids, kind, column, inside, text = [], [], [], [], ""
    for what, arg in segments(answer):
        if what == "text":
            piece = arg
            new = tok(piece, add_special_tokens=False)["input_ids"]
            ids += new
            kind += [0] * len(new)
            column += [-1] * len(new)
            inside += [False] * len(new)
        else:
            triple = None if arg is None else facts[arg]
            piece = span_text(what, triple, text, refusal)
            new = tok(piece, add_special_tokens=False)["input_ids"]
            ids += new
            kind += [1 + kinds.index(what)] + [0] * (len(new) - 1)
            column += [null_column if arg is None else columns[arg]] + [-1] * (len(new) - 1)
            inside += [False] + [True] * (len(new) - 1)
        text += piece
    return ids, kind, column, inside


def _kbs(data: TrainingData, items: list[dict], null_slot: bool):
    """(keys, values (B, M, d), kb_mask (B, M), gold (B,)) of the examples' KBs, padded to the largest."""
    m = max(len(it["kb"]) for it in items)
    b, d = len(items), data.key_emb.shape[1]
    keys, values = torch.zeros(b, m, d), torch.zeros(b, m, d)
    kb_mask = torch.zeros(b, m, dtype=torch.bool)
    gold = torch.full((b,), -1, dtype=torch.long)
    for r, it in enumerate(items):
        kb = torch.tensor(it["kb"], dtype=torch.long)
        n = len(kb)
        keys[r, :n], values[r, :n], kb_mask[r, :n] = data.key_emb[kb], data.value_emb[kb], True
        if it["kind"] == "simple" and it["sources"]:
            gold[r] = it["sources"][0]
        elif it["kind"] == "unanswerable" and null_slot:
            gold[r] = m
    return keys, values, kb_mask, gold


def collate(model, data: TrainingData, rows: list[int]) -> Batch:
    """Assemble examples `rows` into a padded batch with their KBs."""
    from kb_builders.questions import render
    from kblam import copying

    tok, cfg = model.tokenizer, model.config
    if cfg.span_kinds:
        return _collate_spans(model, data, rows)
    items = [data.examples[i] for i in rows]
    keys, values, kb_mask, gold = _kbs(data, items, cfg.null_slot)
    b, m = kb_mask.shape
    width = max(data.value_ids.shape[1], data.refusal_ids.shape[1])
    vid = torch.full((b, m + int(cfg.null_slot), width), copying.PAD, dtype=torch.long)
    prompts, answers = [], []
    for r, it in enumerate(items):
        kb = torch.tensor(it["kb"], dtype=torch.long)
        vid[r, : len(kb), : data.value_ids.shape[1]] = data.value_ids[kb]
        if cfg.null_slot:
            vid[r, m, : data.refusal_ids.shape[1]] = data.refusal_ids[0]
        prompts.append(model.format_prompt(it["question"]))
        facts = [data.pool[it["kb"][j]] for j in it["sources"]]
        answers.append(render(it["answer"], facts, cfg.refusal) + (tok.eos_token or ""))
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tok(answers, add_special_tokens=False)["input_ids"]
    seqs = [p + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
    t = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((b, t), pad, dtype=torch.long)
    attention_mask = torch.zeros(b, t, dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = torch.tensor(s)
        attention_mask[r, : len(s)] = 1
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        answer_start=torch.tensor([len(p) for p in prompt_ids]),
        answer_length=torch.tensor([len(a) for a in answer_ids]),
        keys=keys, values=values, kb_mask=kb_mask,
        queries=data.question_emb[torch.tensor(rows)],
        value_ids=vid, gold=gold, kinds=[it["kind"] for it in items],
    )


def _collate_spans(model, data: TrainingData, rows: list[int]) -> Batch:
    """collate for an adapter with span kinds: answers tokenised with their spans (span_tokens)."""
    tok, cfg = model.tokenizer, model.config
    kinds = tuple(cfg.span_kinds)
    items = [data.examples[i] for i in rows]
    keys, values, kb_mask, gold = _kbs(data, items, cfg.null_slot)
    b, m = kb_mask.shape
    width = m + int(cfg.null_slot)
    prompts, answers = [], []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for it in items:
        prompts.append(model.format_prompt(it["question"]))
        facts = [data.pool[it["kb"][j]] for j in it["sources"]]
        ids, kind, column, inside = span_tokens(tok, it["answer"], facts, list(it["sources"]), m, cfg.refusal, kinds)
        answers.append((ids + eos, kind + [0] * len(eos), column + [-1] * len(eos), inside + [False] * len(eos)))
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    seqs = [p + a[0] for p, a in zip(prompt_ids, answers, strict=True)]
    t, length = max(len(x) for x in seqs), max(len(a[0]) for a in answers)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((b, t), pad, dtype=torch.long)
    attention_mask = torch.zeros(b, t, dtype=torch.long)
    span_kind = torch.zeros(b, length, dtype=torch.long)
    span_column = torch.full((b, length), -1, dtype=torch.long)
    inside_span = torch.zeros(b, length, dtype=torch.bool)
    quoted = torch.zeros(b, length, width, dtype=torch.bool)
    for r, (x, (ids, kind, column, inside)) in enumerate(zip(seqs, answers, strict=True)):
        input_ids[r, : len(x)] = torch.tensor(x)
        attention_mask[r, : len(x)] = 1
        n = len(ids)
        span_kind[r, :n], span_column[r, :n] = torch.tensor(kind), torch.tensor(column)
        inside_span[r, :n] = torch.tensor(inside, dtype=torch.bool)
        for step, col in enumerate(column):
            if col >= 0:
                quoted[r, step + 1:, col] = True  # quoted from the next token on
    return Batch(
        input_ids=input_ids, attention_mask=attention_mask,
        answer_start=torch.tensor([len(p) for p in prompt_ids]),
        answer_length=torch.tensor([len(a[0]) for a in answers]),
        keys=keys, values=values, kb_mask=kb_mask,
        queries=data.question_emb[torch.tensor(rows)],
        value_ids=None, gold=gold, kinds=[it["kind"] for it in items],
        span_kind=span_kind, span_column=span_column, inside_span=inside_span, quoted=quoted,
    )
