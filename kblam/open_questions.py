"""Open questions ("Tell me about gold."): answered with the named entity's facts, stated whole.

An open question names an entity and no property, so the calibrated confidence, which asks whether
the KB holds the property asked for, has nothing to hold on to and refuses it. Such a question is
recognised by its words instead: once the name of an entity among its best sources, function words
and the words that ask for everything ("tell", "know", "describe", ...) are taken away, nothing is
left. "What is the population of Plutonium?" leaves "population" and stays a one-fact question (and is
refused when Plutonium has no population); "Tell me about Atlantis" names no KB entity and stays with
the calibrated refusal.

The cue words are those of the training wordings (kb_builders.questions.TRAIN_OPEN_PHRASINGS), not of
the held-out evaluation's: a wording whose words are not among them ("Fill me in on X") is not
recognised, and is answered (or refused) as a one-fact question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kblam.confidence import run_at, words
from kblam.kb import Triple

MAX_FACTS = 4  # as many as the training answers to open questions state (kb_builders.questions)

FUNCTION_WORDS = frozenset(
    "a an the of on in about for to from me you we us i it its do does did is are was were be what who which "
    "or and can could would will some any have has please s your my this that there with".split())
CUES = frozenset(
    "tell know knowledge base give fact facts describe share information info overview everything want "
    "learn brief recorded".split())


def open_facts(question: str, shares: torch.Tensor, triple_of: Callable[[int], Triple | None],
               limit: int = MAX_FACTS) -> list[Triple]:
    """The facts to state for an open question (at most `limit`, one per property, in the KB's order),
    or [] when the question is not an open question about an entity among its 64 best sources."""
    near = torch.topk(shares, min(64, shares.numel())).indices.tolist()
    asked = words(question)
    entity = _named_entity(asked, [triple_of(j) for j in near])
    if entity is None:
        return []
    name = set(words(entity))
    if any(w not in name and w not in FUNCTION_WORDS and w not in CUES for w in asked):
        return []
    facts: dict[str, Triple] = {}
    for j in sorted(near):  # the KB's order (a pre-filtered KB: its candidates' order)
        t = triple_of(j)
        if t is not None and t.name == entity and t.property not in facts:
            facts[t.property] = t
    return list(facts.values())[:limit]


def _named_entity(asked: Sequence[str], near: Sequence[Triple | None]) -> str | None:
    """The longest entity name among the sources whose words the question holds in a row."""
    best = None
    for t in near:
        if t is None or (best is not None and len(words(t.name)) <= len(words(best))):
            continue
        name = words(t.name)
        if run_at(list(asked), name) >= 0:
            best = t.name
    return best
