"""Grounded answers, judged as a user would: the KB's exact value, or an honest refusal (`kblam eval`).

KBs hold whole entities, drawn from a dataset: the synthetic test split (or train split, for
validation) or a real-fact dataset (kb_builders.real_kbs). Questions:
- simple: one fact, in the dataset's own wordings (held out from training), some with a one-letter
  typo in the name, in lower case or without a question mark, as people type;
- multi: two or three properties of one entity; open: "what do you know about X";
- unknowns, four kinds of near miss: an entity the KB lacks asked a property the KB has
  ("absent entity"); a KB entity asked a property it lacks ("absent property"); both ("both absent");
  an absent entity whose name is close to a KB entity's ("near duplicate", Iridium for Iron).

Scores:
- exact: the answer states the value and nothing else new. Its words, less the question's words and a
  few function words (compared by a crude suffix stem: "joined" echoes "join"), and less the asked
  triple's own name and property words, are the value's words, in order ("exact_strict": the question's
  and function words only, as issue 9 first defined it); and the value appears
  in the answer once the question's mention of the entity is taken out ("London" for London Heathrow
  Airport's city must be said, not only echoed from the name). A refusal is not exact.
- contains: the value appears (as above); refusal recall on unknowns; false refusals on simple ones;
- multi: every asked value appears; open: the share of quoted facts that are the entity's, and whether
  any word is stated that neither the question nor the entity's KB facts hold (an invented fact);
- counterfactual: on a KB whose values were swapped among entities, exact against the KB's value.

Each question is asked once with min_confidence=0; refusing at any threshold is then computed from the
recorded confidence (`score(records, threshold)`), which is what calibration needs.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kblam.kb import Triple

FUNCTION_WORDS = frozenset(
    "the a an of is are was were be been in on at by for to and or its it has have had s this that with as "
    "from which what who whom where when how i me my you your".split()
)
UNKNOWN_KINDS = ("absent entity", "absent property", "both absent", "near duplicate")
_WORD = re.compile(r"\w+", re.UNICODE)
_TYPO_RATE, _LOWER_RATE, _BARE_RATE = 0.1, 0.1, 0.15

EVAL_MULTI_PHRASINGS = (
    "I'd like the {properties} of {name}.",
    "Could you give me the {properties} of {name}?",
    "{name} - {properties}?",
)
EVAL_OPEN_PHRASINGS = (
    "Fill me in on {name}.",
    "What information do you have on {name}?",
    "Summarise what is known about {name}.",
    "What does the knowledge base say about {name}?",
)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _without(text: str, mention: str | None) -> str:
    if not mention:
        return text
    return re.sub(re.escape(mention), " ", text, flags=re.IGNORECASE)


def states(answer: str, value: str, mention: str | None) -> bool:
    """The value's words appear, in a row, in the answer once the entity's mention is taken out (unless
    the value holds the mention itself: "Cabo Verde Escudo" for Cabo Verde's currency)."""
    holds = mention and " ".join(words(mention)) in " ".join(words(value))
    got, want = " ".join(words(answer if holds else _without(answer, mention))), " ".join(words(value))
    return bool(want) and f" {want} " in f" {got} "


def stem(word: str) -> str:
    """A crude suffix stem, so that "joined" echoes "join" and "abbreviates" "abbreviate"."""
    for suffix, shortest in (("ing", 6), ("ed", 5), ("es", 5), ("s", 4)):
        if word.endswith(suffix) and len(word) >= shortest:
            return word[: -len(suffix)]
    return word


def exact(answer: str, value: str, question: str, mention: str | None, triple: Triple | None = None) -> bool:
    """states(), and the answer adds no word but the value's, beyond the question's and function words
    (and, given the asked `triple`, the words of its own name and property: restating the KB's key is
    not new information; without it, the strict form of the metric). Words compare by stem()."""
    if not states(answer, value, mention):
        return False
    known = {stem(w) for w in words(question)} | FUNCTION_WORDS
    if triple is not None:
        known |= {stem(w) for w in words(f"{triple.name} {triple.property}")} - {stem(w) for w in words(value)}
    new = [stem(w) for w in words(answer) if stem(w) not in known]
    return new == [stem(w) for w in words(value) if stem(w) not in known]


@dataclass
class Item:
    question: str
    kind: str  # simple | multi | open | counterfactual | one of UNKNOWN_KINDS
    facts: tuple[Triple, ...] = ()  # the asked triples; for open, the entity's triples in the KB
    mention: str | None = None  # the entity's name as the question writes it


@dataclass
class Dataset:
    """Where KBs and questions come from: whole entities, and how each property is asked."""

    name: str
    triples: list[Triple]
    wording: Callable[[Triple, random.Random], str]  # a question template with {name}
    absent_wording: Callable[[random.Random], str | None]  # a property no entity has, as a template, or None
    phrase: Callable[[str], str] = lambda p: p

    def entities(self) -> dict[str, list[Triple]]:
        out: dict[str, list[Triple]] = {}
        for t in self.triples:
            out.setdefault(t.name, []).append(t)
        return out


def synthetic_dataset(split: str = "test", entities: int = 4000, seed: int = 4242) -> Dataset:
    """The synthetic split, asked with the held-out wordings of kb_builders.questions."""
    from kb_builders import questions
    from kb_builders.synthetic import ENTITY_TYPES, synthetic_triples

    def wording(triple: Triple, rng: random.Random) -> str:
        template, _ = questions.asked(Triple("{name}", triple.property, triple.value), rng, heldout=True)
        return template

    others = sorted({p.name for et in ENTITY_TYPES.values() for p in et.properties})

    def absent(rng: random.Random) -> str:
        return wording(Triple("x", rng.choice(others), "?"), rng)

    return Dataset(f"synthetic-{split}", synthetic_triples(entities, seed=seed, split=split), wording, absent)


def real_dataset(name: str) -> Dataset:
    from kb_builders.real_kbs import REAL_KBS, real_kb_triples

    spec = REAL_KBS[name]

    def wording(triple: Triple, rng: random.Random) -> str:
        return rng.choice(spec.wordings[triple.property])

    def absent(rng: random.Random) -> str | None:
        if not spec.absent_wordings:
            return None
        return rng.choice(spec.absent_wordings[rng.choice(sorted(spec.absent_wordings))])

    return Dataset(name, real_kb_triples(name), wording, absent, lambda p: spec.property_phrases.get(p, p))


def dataset(name: str) -> Dataset:
    if name.startswith("synthetic"):
        return synthetic_dataset(name.split("-", 1)[1] if "-" in name else "test")
    return real_dataset(name)


def draw_kb(data: Dataset, size: int, seed: int) -> tuple[list[Triple], dict[str, list[Triple]], list[Triple]]:
    """(KB of `size` triples of whole entities, absent entities, KB entities' left-out triples).

    One KB entity in eight leaves out one of its properties, for "absent property" questions.
    """
    rng = random.Random(f"{data.name}:{size}:{seed}")
    by_name = data.entities()
    names = sorted(by_name)
    rng.shuffle(names)
    kb, left_out, taken = [], [], 0
    for name in names:
        own = list(by_name[name])
        if len(own) > 2 and rng.random() < 0.125:
            left_out.append(own.pop(rng.randrange(len(own))))
        kb += own
        taken += 1
        if len(kb) >= size:
            break
    if len(kb) < size:
        raise ValueError(f"{data.name} has {len(kb)} triples, fewer than a KB of {size}")
    left_out += kb[size:]
    kb = kb[:size]
    kept = {t.name for t in kb}
    left_out = [t for t in left_out if t.name in kept]
    absent = {n: by_name[n] for n in names[taken:]}
    return kb, absent, left_out


def _vary(template: str, name: str, rng: random.Random, variants: bool) -> tuple[str, str]:
    """(question, the name as it stands in it): a typo, lower case, no question mark, at the eval rates."""
    from kb_builders.questions import _typo

    mention = _typo(name, rng) if variants and rng.random() < _TYPO_RATE else name
    question = template.format(name=mention)
    if variants and rng.random() < _LOWER_RATE:
        question, mention = question.lower(), mention.lower()
    if variants and rng.random() < _BARE_RATE:
        question = question.rstrip("?.")
    return question, mention


def _near_duplicates(kb_names: Sequence[str], absent: Sequence[str], limit: int) -> list[str]:
    """Absent names closest to a KB name (same first three letters, small edit distance), closest first."""
    from kblam.confidence import name_match

    by_prefix: dict[str, list[str]] = {}
    for n in kb_names:
        by_prefix.setdefault(n[:3].lower(), []).append(n)
    scored = []
    for a in absent:
        best = max((name_match(n, a)[0] for n in by_prefix.get(a[:3].lower(), ())), default=0.0)
        if 0.5 <= best < 1.0:
            scored.append((-best, a))
    return [a for _, a in sorted(scored)[:limit]]


def build_items(data: Dataset, kb: list[Triple], absent: dict[str, list[Triple]], left_out: list[Triple], *,
                seed: int, simple: int = 40, unknown: int = 24, multi: int = 6, opened: int = 6,
                variants: bool = True) -> list[Item]:
    rng = random.Random(f"items:{data.name}:{len(kb)}:{seed}")
    own: dict[str, list[Triple]] = {}
    for t in kb:
        own.setdefault(t.name, []).append(t)
    kb_properties = sorted({t.property for t in kb})
    items = []
    for t in rng.sample(kb, min(simple, len(kb))):
        question, mention = _vary(data.wording(t, rng), t.name, rng, variants)
        items.append(Item(question, "simple", (t,), mention))
    absent_names = sorted(absent)
    near = _near_duplicates(sorted(own), absent_names[:5000], max(1, unknown // 4))
    for k in range(unknown):
        kind = UNKNOWN_KINDS[k % len(UNKNOWN_KINDS)]
        template = name = None
        if kind == "absent entity" or (kind == "near duplicate" and not near):
            name = rng.choice(absent_names)
            asked = [t for t in absent[name] if t.property in kb_properties] or absent[name]
            template = data.wording(rng.choice(asked), rng)
        elif kind == "near duplicate":
            name = near[k // len(UNKNOWN_KINDS) % len(near)]
            asked = [t for t in absent[name] if t.property in kb_properties] or absent[name]
            template = data.wording(rng.choice(asked), rng)
        elif kind == "absent property":
            if left_out and rng.random() < 0.5:
                t = rng.choice(left_out)
                name, template = t.name, data.wording(t, rng)
            else:
                name, template = rng.choice(sorted(own)), data.absent_wording(rng)
        else:  # both absent
            name, template = rng.choice(absent_names), data.absent_wording(rng)
        if template is None:
            continue
        question, mention = _vary(template, name, rng, variants)
        items.append(Item(question, kind, (), mention))
    several = [n for n, ts in own.items() if len({t.property for t in ts}) >= 2]
    for _ in range(multi if several else 0):
        name = rng.choice(several)
        facts = rng.sample(own[name], min(len(own[name]), rng.choice((2, 2, 3))))
        phrases = [data.phrase(t.property) for t in facts]
        listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        template = rng.choice(EVAL_MULTI_PHRASINGS).replace("{properties}", listed)
        items.append(Item(template.format(name=name), "multi", tuple(facts), name))
    for name in rng.sample(sorted(own), min(opened, len(own))):
        items.append(Item(rng.choice(EVAL_OPEN_PHRASINGS).format(name=name), "open", tuple(own[name]), name))
    return items


@dataclass
class Record:
    item: Item
    text: str
    quoted: list[Triple]
    top: Triple | None
    confidence: float | None
    refused_by_model: bool  # the answer is the refusal although asked with min_confidence=0
    signals: dict[str, float] = field(default_factory=dict)
    size: int = 0
    dataset: str = ""

    def refused(self, threshold: float) -> bool:
        return self.refused_by_model or (self.confidence is not None and self.confidence < threshold)


def run(model, kb: list[Triple], items: Sequence[Item], *, batch_size: int = 8, prefilter: bool | None = None,
        max_new_tokens: int = 64, progress=None, dataset_name: str = "", spans: bool | None = None) -> list[Record]:
    embeddings = model.encode_kb(kb)
    records = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start:start + batch_size])
        answers = model.ask([it.question for it in chunk], kb=embeddings, max_new_tokens=max_new_tokens,
                            max_sources=1, min_confidence=0.0, prefilter=prefilter, spans=spans)
        for it, a in zip(chunk, answers, strict=True):
            records.append(Record(it, a.text, list(a.quoted), a.sources[0][0] if a.sources else None,
                                  a.confidence, a.refused, dict(a.signals), len(kb), dataset_name))
        if progress is not None:
            progress.update(len(chunk))
    return records


def correct(r: Record, threshold: float) -> bool:
    """Whether the record is right at this threshold (simple/counterfactual: exact; unknown: refused)."""
    if r.item.kind in UNKNOWN_KINDS:
        return r.refused(threshold)
    if r.refused(threshold):
        return False
    if r.item.kind in ("simple", "counterfactual"):
        fact = r.item.facts[0]
        return exact(r.text, fact.value, r.item.question, r.item.mention, fact)
    if r.item.kind == "multi":
        return all(states(r.text, t.value, r.item.mention) for t in r.item.facts)
    return open_invented(r) is False


def open_invented(r: Record) -> bool:
    """Whether an open answer says a word that neither the question nor the entity's KB facts hold."""
    known = set(words(r.item.question)) | FUNCTION_WORDS
    for t in r.item.facts:
        known |= set(words(f"{t.name} {t.property} {t.value}"))
    return any(w not in known for w in words(r.text))


def score(records: Sequence[Record], threshold: float) -> dict[str, float | int]:
    """The metrics of the module's docstring over `records`, refusing below `threshold`."""
    def share(hits: list[bool]) -> float:
        return sum(hits) / len(hits) if hits else float("nan")

    simple = [r for r in records if r.item.kind == "simple"]
    unknown = [r for r in records if r.item.kind in UNKNOWN_KINDS]
    multi = [r for r in records if r.item.kind == "multi"]
    opened = [r for r in records if r.item.kind == "open"]
    counter = [r for r in records if r.item.kind == "counterfactual"]
    out: dict[str, float | int] = {
        "questions": len(records),
        "exact": share([correct(r, threshold) for r in simple]),
        "exact_strict": share([not r.refused(threshold) and exact(r.text, r.item.facts[0].value, r.item.question,
                                                                 r.item.mention) for r in simple]),
        "contains": share([not r.refused(threshold) and states(r.text, r.item.facts[0].value, r.item.mention)
                           for r in simple]),
        "top1": share([r.top == r.item.facts[0] for r in simple]),
        "false_refusals": share([r.refused(threshold) for r in simple]),
        "refusal_recall": share([r.refused(threshold) for r in unknown]),
        "multi_all_values": share([correct(r, threshold) for r in multi]),
        "open_fact_precision": _open_precision(opened, threshold),
        "open_no_invented": share([not r.refused(threshold) and not open_invented(r) for r in opened]),
        "counterfactual_follows": share([correct(r, threshold) for r in counter]),
    }
    for kind in UNKNOWN_KINDS:
        out[f"recall[{kind}]"] = share([r.refused(threshold) for r in unknown if r.item.kind == kind])
    return out


def _open_precision(records: Sequence[Record], threshold: float) -> float:
    stated = right = 0
    for r in records:
        if r.refused(threshold):
            continue
        for t in r.quoted:
            stated += 1
            right += t in r.item.facts
    return right / stated if stated else float("nan")


def evaluate(model, names: Sequence[str], sizes: Sequence[int], *, kbs: int = 2, seed: int = 1234,
             simple: int = 40, unknown: int = 24, multi: int = 6, opened: int = 6, counterfactual: int = 0,
             prefilter_from: int = 10_000, batch_size: int = 8, progress: bool = True, spans: bool | None = None,
             log=print) -> list[Record]:
    """Ask every dataset's KBs of every size (those the dataset can fill); returns all records.

    KBs of `prefilter_from` triples or more are read through the pre-filter. `counterfactual` adds that
    many questions per KB over a copy of the KB with values swapped among entities (its smallest size).
    """
    from tqdm.auto import tqdm

    from kb_builders.real_facts import counterfactual as swap

    records: list[Record] = []
    for name in names:
        data = dataset(name)
        for size in sizes:
            if size > 0.9 * len(data.triples):
                log(f"{name}: {len(data.triples)} triples, too few for KBs of {size}; skipped")
                continue
            for k in range(kbs):
                began = time.perf_counter()
                kb, absent, left_out = draw_kb(data, size, seed + k)
                items = build_items(data, kb, absent, left_out, seed=seed + k, simple=simple, unknown=unknown,
                                    multi=multi, opened=opened)
                with tqdm(total=len(items), desc=f"{name} {size} #{k}", disable=not progress, leave=False) as bar:
                    got = run(model, kb, items, batch_size=batch_size, prefilter=size >= prefilter_from,
                              progress=bar, dataset_name=name, spans=spans)
                records += got
                if counterfactual and size == min(sizes):
                    swapped = swap(kb, seed=seed + k, strict=False)
                    changed = {(t.name, t.property): t for t in swapped}
                    cf_kb = [changed.get((t.name, t.property), t) for t in kb]
                    rng = random.Random(f"cf:{name}:{seed + k}")
                    cf_items = []
                    for t in rng.sample(swapped, min(counterfactual, len(swapped))):
                        question, mention = _vary(data.wording(t, rng), t.name, rng, False)
                        cf_items.append(Item(question, "counterfactual", (t,), mention))
                    records += run(model, cf_kb, cf_items, batch_size=batch_size, dataset_name=name, spans=spans)
                log(f"{name} {size} #{k}: {len(got)} questions in {time.perf_counter() - began:.0f} s")
    return records


# The floors of issue 9 (docs/benchmarks.md): size -> metric -> (floor, at least / at most).
FLOORS = {
    100: {"exact": (0.95, ">="), "refusal_recall": (0.90, ">="), "false_refusals": (0.05, "<=")},
    1000: {"exact": (0.92, ">="), "refusal_recall": (0.90, ">="), "false_refusals": (0.05, "<=")},
    10000: {"exact": (0.90, ">=")},
    "any": {"multi_all_values": (0.85, ">="), "open_fact_precision": (0.85, ">="),
            "counterfactual_follows": (0.95, ">=")},
}
COLUMNS = ("exact", "exact_strict", "contains", "top1", "refusal_recall", "false_refusals", "multi_all_values",
           "open_fact_precision", "open_no_invented", "counterfactual_follows")


def floor_mark(size: int, metric: str, value: float) -> str:
    rule = FLOORS.get(size, {}).get(metric) or FLOORS["any"].get(metric)
    if rule is None or value != value:
        return ""
    floor, how = rule
    return " ok" if (value >= floor if how == ">=" else value <= floor) else " MISS"


def table(records: Sequence[Record], threshold: float) -> tuple[str, list[dict]]:
    """A markdown table per (dataset, size), floors marked, and its rows as dicts."""
    groups: dict[tuple[str, int], list[Record]] = {}
    for r in records:
        groups.setdefault((r.dataset, r.size), []).append(r)
    header = "| dataset | triples | questions | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (3 + len(COLUMNS))]
    rows = []
    for (name, size), group in groups.items():
        metrics = score(group, threshold)
        cells = []
        for c in COLUMNS:
            v = metrics[c]
            cells.append("-" if v != v else f"{v:.2f}{floor_mark(size, c, v)}")
        lines.append(f"| {name} | {size:,} | {metrics['questions']} | " + " | ".join(cells) + " |")
        rows.append({"dataset": name, "size": size, **metrics})
    return "\n".join(lines), rows
