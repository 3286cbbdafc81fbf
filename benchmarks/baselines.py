"""Baselines that kblam is compared with, on the same base model: in-context facts, FAISS RAG, zero-shot.

Each baseline answers with the *base* causal LM alone (its own `generate`, greedy) and the model's chat
template; the facts it is given are pasted into the user message as text lines
("The {property} of {name} is {value}."). None of them touches the kblam adapter: they are built from a
base model, its tokenizer and (RAG only) the sentence encoder, e.g. `ICLBaseline.from_kblam(model)`
takes exactly those parts of a loaded KBLaM. With no KB attached, a KBLaM-wrapped base model is the base
model bit for bit, so sharing one loaded model with kblam changes nothing.

    answer(questions, kb) -> list[(text, retrieved_triples_or_None)]

- `ICLBaseline`: every triple in the prompt. A prompt that does not fit the context window (prompt +
  max_new_tokens > the model's max_position_embeddings) raises `ContextOverflow`, which benchmarks record
  as "exceeds context N" rather than dropping triples. The facts are a prefix shared by all questions on a
  KB: it is run once and its key/value cache reused for every question (the numbers are the same as
  without the cache; it only saves time).
- `RAGBaseline`: an exact FAISS index (`kblam.prefilter.KBPrefilter`, cosine) over the triples' key
  sentences ("The {property} of {name}", the same text kblam encodes as keys), queried with the
  question's embedding; the top-k (default 5) triples go into the prompt, best first.
- `ZeroShotBaseline`: the question alone, with the same refusal instruction.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from kb_builders.questions import REFUSAL
from kblam.kb import KEY_TEMPLATE, Triple

FACTS_INSTRUCTION = (
    "Answer the question using only the facts below. If the facts do not contain the answer, "
    'reply exactly: "{refusal}"'
)
ZERO_SHOT_INSTRUCTION = 'Answer the question. If you do not know the answer, reply exactly: "{refusal}"'

Result = tuple[str, "list[Triple] | None"]


def fact_line(triple: Triple) -> str:
    return f"The {triple.property} of {triple.name} is {triple.value}."


class ContextOverflow(RuntimeError):
    """The prompt plus the answer's tokens do not fit the model's context window."""

    def __init__(self, tokens: int, limit: int):
        self.tokens, self.limit = tokens, limit
        super().__init__(f"exceeds context {limit} ({tokens} tokens needed)")

    @property
    def status(self) -> str:
        return f"exceeds context {self.limit}"


class _Baseline:
    """Prompting and greedy generation with the base model alone."""

    name = "baseline"

    def __init__(self, base, tokenizer, *, max_new_tokens: int = 32, batch_size: int = 20,
                 refusal: str = REFUSAL, system_prompt: str | None = None, context_limit: int | None = None):
        self.base = base
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.refusal = refusal
        self.system_prompt = system_prompt  # None: the chat template's own default
        if context_limit is None and base is not None:
            context_limit = getattr(base.config, "max_position_embeddings", None)
        self.context_limit = context_limit
        self._prefix_memo: tuple[str, list[int]] | None = None

    @classmethod
    def from_kblam(cls, model, **kwargs):
        """The baseline over a loaded KBLaM's base model and tokenizer (its adapter is not used).

        It takes the same system prompt as kblam's prompts, so every method sees the same frame."""
        kwargs.setdefault("system_prompt", model.config.system_prompt)
        return cls(model.base, model.tokenizer, **kwargs)

    # --- prompts ------------------------------------------------------------------------------

    def chat(self, user_text: str) -> str:
        """The user message as the base model expects it: its chat template, if it has one."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": user_text}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{user_text}\nAnswer:"

    def user_message(self, question: str, facts: Sequence[Triple] | None) -> str:
        if facts is None:
            return f"{ZERO_SHOT_INSTRUCTION.format(refusal=self.refusal)}\n\nQuestion: {question}"
        lines = "\n".join(fact_line(t) for t in facts)
        return f"{FACTS_INSTRUCTION.format(refusal=self.refusal)}\n\nFacts:\n{lines}\n\nQuestion: {question}"

    def split_prompt(self, question: str, facts: Sequence[Triple] | None) -> tuple[list[int], list[int]]:
        """(prefix ids, question ids): the prompt's tokens before the question and from it on.

        The two halves are tokenized separately, so the prefix is the same for every question.
        """
        prompt = self.chat(self.user_message(question, facts))
        cut = prompt.rfind(question)
        tok = self.tokenizer
        if self._prefix_memo is None or self._prefix_memo[0] != prompt[:cut]:  # one KB, many questions
            self._prefix_memo = (prompt[:cut], list(tok(prompt[:cut], add_special_tokens=False)["input_ids"]))
        rest = tok(prompt[cut:], add_special_tokens=False)["input_ids"]
        return list(self._prefix_memo[1]), list(rest)

    def check_fits(self, tokens: int) -> None:
        if self.context_limit is not None and tokens + self.max_new_tokens > self.context_limit:
            raise ContextOverflow(tokens + self.max_new_tokens, self.context_limit)

    # --- generation ---------------------------------------------------------------------------

    def _pad_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok.pad_token_id

    def _gen_kwargs(self, **extra) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=False, temperature=None, top_p=None,
                      top_k=None, pad_token_id=self._pad_id())
        kwargs.update(extra)
        return kwargs

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[Sequence[int]], **generate_kwargs) -> list[str]:
        """Greedy answers to prompts given as token ids, left-padded into batches of batch_size."""
        pad = self._pad_id()
        device = next(self.base.parameters()).device
        texts: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = self.base.generate(input_ids=ids, attention_mask=mask, **self._gen_kwargs(**generate_kwargs))
            texts += self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def _prompts(self, questions: Sequence[str], facts: Sequence[Triple] | None) -> list[list[int]]:
        prompts = []
        for q in questions:
            prefix, rest = self.split_prompt(q, facts)
            self.check_fits(len(prefix) + len(rest))
            prompts.append(prefix + rest)
        return prompts


class ZeroShotBaseline(_Baseline):
    """The base model with no KB at all."""

    name = "zero-shot"

    def answer(self, questions: Sequence[str], kb=None, **generate_kwargs) -> list[Result]:
        texts = self.generate_ids(self._prompts(questions, None), **generate_kwargs)
        return [(t, None) for t in texts]


class ICLBaseline(_Baseline):
    """Every triple of the KB as a text line in the prompt, or ContextOverflow when they do not fit."""

    name = "icl"

    def prompt_tokens(self, kb: Sequence[Triple], question: str) -> int:
        prefix, rest = self.split_prompt(question, list(kb))
        return len(prefix) + len(rest)

    def check(self, questions: Sequence[str], kb: Sequence[Triple]) -> tuple[list[int], list[list[int]]]:
        """(shared prefix ids, per-question ids); raises ContextOverflow if any prompt does not fit."""
        facts = list(kb)
        prefix: list[int] | None = None
        rests = []
        for q in questions:
            p, rest = self.split_prompt(q, facts)
            if prefix is None:
                prefix = p
            elif p != prefix:
                raise ValueError("the ICL prompt prefix is not shared across questions")
            self.check_fits(len(prefix) + len(rest))
            rests.append(rest)
        return prefix or [], rests

    @torch.no_grad()
    def answer(self, questions: Sequence[str], kb: Sequence[Triple], **generate_kwargs) -> list[Result]:
        prefix, rests = self.check(questions, kb)
        pad = self._pad_id()
        device = next(self.base.parameters()).device
        prefix_ids = torch.tensor([prefix], device=device)
        cache = self.base(input_ids=prefix_ids, use_cache=True).past_key_values
        texts: list[str] = []
        for start in range(0, len(rests), self.batch_size):
            chunk = rests[start:start + self.batch_size]
            b, width = len(chunk), max(len(r) for r in chunk)
            # Padding sits between the shared prefix and each question; it is masked, and position ids
            # (from the mask's cumulative sum) continue from the prefix without gaps.
            tail = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], device=device)
            tail_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=device)
            ids = torch.cat([prefix_ids.expand(b, -1), tail], dim=1)
            mask = torch.cat([torch.ones(b, len(prefix), dtype=torch.long, device=device), tail_mask], dim=1)
            past = copy.deepcopy(cache)
            if b > 1:
                past.batch_repeat_interleave(b)
            out = self.base.generate(input_ids=ids, attention_mask=mask, past_key_values=past,
                                     **self._gen_kwargs(**generate_kwargs))
            texts += self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return [(t.strip(), None) for t in texts]  # every triple is in the prompt: no ranking


class RAGBaseline(_Baseline):
    """Top-k triples by cosine between the question and the triples' key sentences (exact FAISS)."""

    name = "rag"

    def __init__(self, base, tokenizer, encoder, *, k: int = 5, key_template: str = KEY_TEMPLATE, **kwargs):
        super().__init__(base, tokenizer, **kwargs)
        self.encoder = encoder  # a kblam.encoder.KBEncoder (caches texts: re-encoding a KB is free)
        self.k = k
        self.key_template = key_template
        self._index_for: tuple | None = None
        self._index = None

    @classmethod
    def from_kblam(cls, model, **kwargs):
        """RAG over a loaded KBLaM's base model, tokenizer and sentence encoder (its adapter is not used)."""
        kwargs.setdefault("system_prompt", model.config.system_prompt)
        return cls(model.base, model.tokenizer, model.encoder, **kwargs)

    def index(self, kb: Sequence[Triple]):
        """The exact FAISS index over the KB's key embeddings (rebuilt only when the KB changes)."""
        from kblam.prefilter import KBPrefilter

        triples = tuple(kb)
        if self._index_for != triples:
            keys = self.encoder.encode([t.key_text(self.key_template) for t in triples])
            self._index, self._index_for = KBPrefilter(keys, kind="exact"), triples
        return self._index

    def retrieve(self, questions: Sequence[str], kb: Sequence[Triple], k: int | None = None) -> list[list[Triple]]:
        """Per question, the top-k triples, best first."""
        triples = list(kb)
        index = self.index(triples)
        _, rows = index.search(self.encoder.encode(list(questions)), self.k if k is None else k)
        return [[triples[j] for j in row if j >= 0] for row in rows.tolist()]

    def answer(self, questions: Sequence[str], kb: Sequence[Triple], **generate_kwargs) -> list[Result]:
        retrieved = self.retrieve(questions, kb)
        prompts = []
        for q, facts in zip(questions, retrieved, strict=True):
            prefix, rest = self.split_prompt(q, facts)
            self.check_fits(len(prefix) + len(rest))
            prompts.append(prefix + rest)
        texts = self.generate_ids(prompts, **generate_kwargs)
        return list(zip(texts, retrieved, strict=True))


class KBLaMSystem:
    """kblam itself behind the same `answer` interface: `model.ask`, sources as the retrieval ranking."""

    name = "kblam"

    def __init__(self, model, *, max_new_tokens: int = 32, batch_size: int = 20, max_sources: int = 5):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_sources = max_sources
        self.refusal = model.config.refusal

    def answer(self, questions: Sequence[str], kb, **generate_kwargs) -> list[Result]:
        embeddings = self.model.encode_kb(kb)
        out: list[Result] = []
        for start in range(0, len(questions), self.batch_size):
            answers = self.model.ask(list(questions[start:start + self.batch_size]), kb=embeddings,
                                     max_new_tokens=self.max_new_tokens, max_sources=self.max_sources,
                                     **generate_kwargs)
            out += [(a.text, [t for t, _ in a.sources]) for a in answers]
        return out
