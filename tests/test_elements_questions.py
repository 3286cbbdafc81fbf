"""25 hand-written questions over examples/elements.csv, asked as users ask them, with the shipped adapter.

Each is judged as a user would: the KB's value stated exactly (kblam.training.answer_eval.exact), or the
refusal where the KB lacks the fact. At least 23 of 25 must be right (issue 9); the test prints every
answer so a miss is easy to read. Slow: loads the embedded default model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kblam import KBLaM, KnowledgeBase, Triple
from kblam.training.answer_eval import FUNCTION_WORDS, exact, states, words

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parents[1] / "examples" / "elements.csv"
REFUSE = None

# (question, what a right answer holds): a (name, property) asked, REFUSE, or ("all", [...]) / ("open", name).
QUESTIONS = [
    ("What is the chemical symbol of gold?", ("Gold", "symbol")),
    ("When was oxygen discovered?", REFUSE),  # the KB has no discovery year for oxygen
    ("Tell me about gold.", ("open", "Gold")),
    ("What are the symbol and atomic number of iron?", ("all", [("Iron", "symbol"), ("Iron", "atomic number")])),
    ("Which element has the symbol Fe?", ("name", "Iron")),
    ("what is gold's symbol", ("Gold", "symbol")),
    ("Who discovered chlorine?", ("Chlorine", "discoverer")),
    ("What is the population of Plutonium?", REFUSE),
    ("What is the symbol of iridium?", REFUSE),
    ("What is the atomic number of iron?", ("Iron", "atomic number")),
    ("When was sodium discovered?", ("Sodium", "year of discovery")),
    ("Who discovered polonium?", ("Polonium", "discoverer")),
    ("Is mercury a solid, a liquid or a gas at room temperature?", ("Mercury", "state at room temperature")),
    ("What category of element is bromine?", ("Bromine", "category")),
    ("How many protons does uranium have?", ("Uranium", "atomic number")),
    ("hydrogen atomic number", ("Hydrogen", "atomic number")),
    ("In what year was nitrogen discovered", ("Nitrogen", "year of discovery")),
    ("What's Helium's category?", ("Helium", "category")),
    ("What is the symbol for sodium?", ("Sodium", "symbol")),
    ("Who discovered Uranium?", ("Uranium", "discoverer")),
    ("What is the atomic number of carbon?", REFUSE),
    ("What is the melting point of gold?", REFUSE),
    ("What is the chemical symbol of Mercry?", ("Mercury", "symbol")),
    ("What state is chlorine in at room temperature?", ("Chlorine", "state at room temperature")),
    ("Who discovered gold?", REFUSE),
]


@pytest.fixture(scope="module")
def answers():
    kb = KnowledgeBase.from_csv(EXAMPLE)
    model = KBLaM.from_pretrained()
    got = model.ask([q for q, _ in QUESTIONS], kb=kb, max_new_tokens=48)
    return kb, model, got


def right(kb: KnowledgeBase, answer, want) -> bool:
    facts = {(t.name, t.property): t for t in kb}
    if want is REFUSE:
        return answer.refused
    if answer.refused:
        return False
    if want[0] == "all":
        return all(states(answer.text, facts[key].value, None) for key in want[1])
    if want[0] == "open":  # some of the entity's facts, quoted, and no word the question and its facts lack
        own = [t for t in kb if t.name == want[1]]
        known = set(words(answer.question)) | FUNCTION_WORDS
        for t in own:
            known |= set(words(f"{t.name} {t.property} {t.value}"))
        return bool(answer.quoted) and all(t in own for t in answer.quoted) and set(words(answer.text)) <= known
    if want[0] == "name":
        return want[1].lower() in words(answer.text)
    triple: Triple = facts[want]
    return exact(answer.text, triple.value, answer.question, None, triple)


def test_at_least_23_of_25_right(answers):
    kb, _, got = answers
    verdicts = [right(kb, a, want) for a, (_, want) in zip(got, QUESTIONS, strict=True)]
    report = "\n".join(f"{'ok  ' if v else 'MISS'} {a.question!r} -> {a.text!r}" for a, v in zip(got, verdicts,
                                                                                                strict=True))
    print(report)
    assert sum(verdicts) >= 23, report


def test_the_demo_questions_are_right(answers):
    kb, _, got = answers
    by_question = dict(zip((q for q, _ in QUESTIONS), got, strict=True))
    for question in ("What is the chemical symbol of gold?", "Who discovered chlorine?",
                     "What is the atomic number of iron?"):
        want = dict(QUESTIONS)[question]
        assert right(kb, by_question[question], want), by_question[question].text
