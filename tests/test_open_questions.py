"""Open questions are recognised by their words and answered with the named entity's facts."""

import torch

from kblam import Triple
from kblam.open_questions import MAX_FACTS, open_facts

KB = [
    Triple("Gold", "symbol", "Au"),
    Triple("Gold", "atomic number", "79"),
    Triple("Iron", "symbol", "Fe"),
    Triple("Gold", "category", "transition metal"),
    Triple("Gold", "discoverer", "unknown"),
    Triple("Gold", "state", "solid"),
    Triple("Gold", "symbol", "Au"),  # the same property twice: stated once
    Triple("Rose Gold", "colour", "pink"),
]


def facts(question, best=0):
    shares = torch.full((len(KB),), 0.01)
    shares[best] = 1.0
    return open_facts(question, shares, lambda j: KB[j])


def test_an_open_question_states_the_named_entitys_facts_in_kb_order():
    got = facts("Tell me about gold.", best=3)
    assert got == [KB[0], KB[1], KB[3], KB[4]][:MAX_FACTS]
    assert facts("What do you know about Gold?") == got
    assert facts("gold?") == got and facts("Gold facts") == got


def test_a_question_that_asks_for_something_is_not_open():
    assert facts("What is the population of Gold?") == []  # "population": a one-fact question
    assert facts("Tell me the melting point of gold.") == []
    assert facts("Fill me in on Gold.") == []  # "fill": not a cue of the training wordings


def test_an_entity_not_among_the_sources_or_not_named_is_not_open():
    assert facts("Tell me about Atlantis.") == []
    assert facts("Tell me about Iridium.", best=2) == []  # Iron is near, but the question does not name it


def test_the_longest_name_the_question_holds_wins():
    got = facts("Tell me about rose gold", best=0)
    assert got == [KB[7]]
