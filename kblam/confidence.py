"""Answerability as a calibrated decision: signals measured while reading the question, and a fitted map
from those signals to the probability that the answer states a fact the KB holds.

The null slot alone refuses badly: one learned logit cannot outweigh the sum of many small KB weights,
and the unknowns users ask are near misses (an absent entity asked with a property the KB has, a KB
entity asked a property it lacks), not random names. The signals below separate them far better
(`signals`); a logistic regression fitted on validation KBs (`Calibrator.fit`, never on test KBs)
turns them into `Answer.confidence`, and `ask` refuses below a threshold chosen on the same data.

Signals, per question, from the prompt's forward pass and the encoder:
- top_share, margin, entity_share: the KB attention of the question's tokens on its best triple, that
  minus the second best, and the share on all triples of the best triple's entity;
- null_share: the KB attention on the null slot, against all knowledge tokens;
- cosine_top, cosine_margin: the encoder's question-key cosine of the best triple; best minus second;
- name_match: how well the best triple's entity name appears in the question (1 exact, falling with
  the edit distance of the closest run of words: one typo still scores high, Iron for Iridium does not);
- name_close: 1 when that run is the name or the name with one typo (one edit, no digit changed), else
  0: a step that a logistic fit cannot draw from name_match alone;
- name_repaired: 1 when `ask` put a one-letter typo in the name right before reading the question
  (repair_name), so the fit can trust such a question a little less;
- property_match: the best encoder cosine between the question without that name and a property the
  KB holds for that entity ("When was discovered?" against "year of discovery"): low when the entity
  lacks the property asked;
- log_size: log of the number of triples, so the fit can allow for a flatter attention in a large KB.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kblam.kb import _WORD, Triple, words

CALIBRATION_NAME = "calibration.json"
SIGNALS = ("top_share", "margin", "entity_share", "null_share", "cosine_top", "cosine_margin",
           "name_match", "name_close", "name_repaired", "property_match", "log_size")


def run_at(seq: Sequence[str], run: Sequence[str]) -> int:
    """Where `run` first stands in `seq` word for word, or -1 (also for an empty run)."""
    n = len(run)
    if n:
        for k in range(len(seq) - n + 1):
            if seq[k:k + n] == run:
                return k
    return -1


def _edit_distance(a: str, b: str) -> int:
    """Edit distance with adjacent transpositions (optimal string alignment): a typo such as "Gadoilnium"
    costs 1. Names are short, and the standard library has no edit distance."""
    before, previous = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i]
        for j in range(1, len(b) + 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] != b[j - 1]))
            if before is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cost = min(cost, before[j - 2] + 1)
            current.append(cost)
        before, previous = previous, current
    return previous[-1]


def name_match(name: str, question: str) -> tuple[float, tuple[int, int] | None, int]:
    """(score in [0, 1], the matched character span of the question or None, its edit distance).

    The score is 1 - edit distance / length over the run of question words closest to the name
    (case-insensitive, runs one word shorter or longer included, for a split or merged word).
    """
    name_words = words(name)
    target = " ".join(name_words)
    found = list(_WORD.finditer(question.lower()))
    if not target or not found:
        return 0.0, None, len(target)
    n = len(name_words)
    lowered = [w.group() for w in found]
    start = run_at(lowered, name_words)
    if start >= 0:  # named exactly (the common case): the first such run wins
        return 1.0, (found[start].start(), found[start + n - 1].end()), 0
    best, span, distance = 0.0, None, len(target)
    for size in {max(1, n - 1), n, n + 1}:
        for start in range(0, len(found) - size + 1):
            run = found[start:start + size]
            text = " ".join(lowered[start:start + size])
            if 1.0 - abs(len(text) - len(target)) / max(len(target), len(text)) <= best:
                continue  # edits >= the length difference: this run cannot score higher
            edits = _edit_distance(text, target)
            score = 1.0 - edits / max(len(target), len(text))
            if score > best:
                best, span, distance = score, (run[0].start(), run[-1].end()), edits
    return max(best, 0.0), span, distance


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def close_name(name: str, question: str, match: tuple | None = None) -> tuple[int, tuple[int, int] | None]:
    """(edits, span) of the question's run of words closest to `name`, edits 99 when a digit differs:
    "Celento 3" is another entity than "Celento 7", not a typo of it. `match`: name_match's result for
    the same name and question, when the caller has it already."""
    _, span, edits = match or name_match(name, question)
    if span is not None and _digits(question[span[0]:span[1]]) != _digits(name):
        return 99, span
    return edits, span


def _within_one_edit(a: str, b: str) -> bool:
    """Whether _edit_distance(a, b) <= 1, in one pass: equal, or one substitution, insertion or adjacent
    transposition apart."""
    if a == b:
        return True
    if len(a) > len(b):
        a, b = b, a
    if len(b) - len(a) > 1:
        return False
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    if len(a) < len(b):
        return a[i:] == b[i + 1:]
    return a[i + 1:] == b[i + 1:] or (a[i + 2:] == b[i + 2:] and a[i:i + 2] == b[i:i + 2][::-1])


def repair_name(question: str, names, *, prune: bool = True) -> str | None:
    """The question with a one-letter typo in a KB entity's name put right ("Tanznia" -> "Tanzania"),
    or None: when it names one of `names` exactly, when no name of five letters or more is one edit
    away, or when two different names are (no guessing between them). `prune=False` measures every
    name in full (what the pruning must not change; tested)."""
    asked = words(question)
    runs: dict[int, list[str]] = {}  # words per run -> the question's runs of that many words, as name_match joins them
    found = {}
    for name in set(names):
        name_words = words(name)
        target, n = " ".join(name_words), len(name_words)
        # A name no run of words is within one edit of cannot be exact or one typo away: skip the full edit
        # distances of name_match (a Python loop over every run, for each of the 64 names asked about).
        sizes = {max(1, n - 1), n, n + 1}
        for size in sizes - runs.keys():
            runs[size] = [" ".join(asked[k:k + size]) for k in range(len(asked) - size + 1)]
        if prune and not any(_within_one_edit(run, target) for size in sizes for run in runs[size]):
            continue
        edits, span = close_name(name, question)
        if edits == 0:
            return None
        if edits == 1 and len(name) >= 5:
            found[name] = span
    if len(found) != 1:
        return None
    (name, (start, end)), = found.items()
    return question[:start] + name + question[end:]


def without_name(question: str, span: tuple[int, int] | None) -> str:
    """The question with the matched name cut out: what property_match compares with the properties."""
    return question if span is None else question[:span[0]] + question[span[1]:]


def entity_names(triples) -> dict[str, dict[str, str]]:
    """{first word: {the name's words, joined: the name}} over the triples' entities, in lower case."""
    index: dict[str, dict[str, str]] = {}
    seen = set()
    for t in triples:
        if t.name not in seen:
            seen.add(t.name)
            name_words = words(t.name)
            if name_words:
                index.setdefault(name_words[0], {})[" ".join(name_words)] = t.name
    return index


def merge_names(index: dict, new: dict) -> dict:
    """The names of a KB's next version: merged in place (a removed entity's name stays: a guess that
    names it only misses)."""
    for first, names in new.items():
        index.setdefault(first, {}).update(names)
    return index


def masked_guess(question: str, names: dict[str, dict[str, str]]) -> str | None:
    """What `signals` will encode for property_match if the best source is the entity whose name the
    question holds word for word (the longest, when several), or None when it names none. `ask` encodes
    it with the question, in one encoder call: a call of the encoder streams all its weights, whatever
    the batch (about 6 ms of MiniLM's 8 ms here), so the second text costs a third of a call."""
    asked = words(question)
    best = None
    for i, word in enumerate(asked):
        starting = names.get(word)
        if not starting:
            continue
        # The runs of words starting here, looked up: not every name that starts with this word (a KB's
        # names starting with "the" run to thousands: 2.5 ms a question at 100,000 triples).
        for end in range(i + 1, len(asked) + 1):
            target = " ".join(asked[i:end])
            if target in starting and (best is None or len(target) > len(best[0])):
                best = (target, starting[target])
    return None if best is None else without_name(question, name_match(best[1], question)[1])


@dataclass
class QuestionSignals:
    """What `signals` needs of one question's KB reading."""

    question: str
    shares: torch.Tensor  # (M,) KB attention on the triples, summing to 1
    null_share: float
    cosines: torch.Tensor  # (M,) question-key cosine (-1 where a column is padding)
    triple: callable  # column -> Triple | None
    kb_size: int
    repaired: bool = False  # the question's name was a typo, put right (repair_name)


def signals(items: Sequence[QuestionSignals], encoder) -> list[dict[str, float]]:
    """The signals of each question (see the module's docstring)."""
    out, masked, properties = [], [], []  # properties: per question, those its best entity has
    for it in items:
        k = min(2, it.shares.numel())
        top = torch.topk(it.shares, k)
        column = int(top.indices[0])
        best: Triple | None = it.triple(column)
        cos = torch.topk(it.cosines, min(2, it.cosines.numel())).values
        # The entity's other triples among the 64 best: its facts draw attention if any do, and a Python
        # loop over every column of a 100,000-triple KB would cost more than the attention itself.
        near = torch.topk(it.shares, min(64, it.shares.numel())).indices.tolist()
        same = [j for j in near if best is not None and (t := it.triple(j)) is not None and t.name == best.name]
        match = name_match(best.name, it.question) if best is not None else (0.0, None, 99)
        score, span, _ = match
        edits = close_name(best.name, it.question, match)[0] if best is not None else 99
        masked.append(without_name(it.question, span))
        properties.append(sorted({it.triple(j).property for j in same}) or [""])
        out.append({
            "top_share": float(top.values[0]),
            "margin": float(top.values[0] - (top.values[1] if k > 1 else 0.0)),
            "entity_share": float(it.shares[same].sum()) if same else 0.0,
            "null_share": float(it.null_share),
            "cosine_top": float(it.cosines[column]),
            "cosine_margin": float(cos[0] - (cos[1] if cos.numel() > 1 else -1.0)),
            "name_match": score,
            "name_close": float(best is not None and edits <= (1 if len(best.name) >= 4 else 0)),
            "log_size": math.log(max(it.kb_size, 1)),
            "name_repaired": float(it.repaired),
        })
    if out:
        flat = [p for ps in properties for p in ps]
        encoded = encoder.encode(masked + flat)  # one encoder call for whatever is not cached yet
        q = torch.nn.functional.normalize(encoded[:len(masked)], dim=-1)
        p = torch.nn.functional.normalize(encoded[len(masked):], dim=-1)
        at = 0
        for i, (row, ps) in enumerate(zip(out, properties, strict=True)):
            row["property_match"] = float((p[at:at + len(ps)] @ q[i]).max())
            at += len(ps)
    return out


@dataclass
class Calibrator:
    """Logistic regression from signals to P(the answer states a fact the KB holds), and a threshold."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    threshold: float = 0.5  # ask(min_confidence=None) refuses below this
    report: dict = field(default_factory=dict)  # how it was fitted and how it scored, for the model card

    def confidence(self, rows: Sequence[dict[str, float]]) -> list[float]:
        if not rows:
            return []
        x = torch.tensor([[r[f] for f in self.features] for r in rows], dtype=torch.float64)
        z = (x - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.scale, dtype=torch.float64)
        logits = z @ torch.tensor(self.weights, dtype=torch.float64) + self.bias
        return torch.sigmoid(logits).tolist()

    @classmethod
    def fit(cls, rows: Sequence[dict[str, float]], labels: Sequence[bool], *,
            features: Sequence[str] = SIGNALS, l2: float = 1e-3) -> Calibrator:
        """Fit by L-BFGS on the mean log-loss plus l2 x |w|^2 over standardised features."""
        if len(rows) != len(labels) or len(set(labels)) < 2:
            raise ValueError("fitting a calibrator needs rows of both labels, one label per row")
        x = torch.tensor([[r[f] for f in features] for r in rows], dtype=torch.float64)
        y = torch.tensor([float(v) for v in labels], dtype=torch.float64)
        mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / scale
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(list(features), mean.tolist(), scale.tolist(), w.detach().tolist(), float(b.detach()))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder, CALIBRATION_NAME)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Calibrator | None:
        """The folder's calibrator, or None when it has none."""
        path = Path(folder, CALIBRATION_NAME)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            calibrator = cls(**data)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: not a kblam calibration file ({error})") from None
        n = len(calibrator.features)
        unknown = sorted(set(calibrator.features) - set(SIGNALS))
        if unknown or any(len(v) != n for v in (calibrator.mean, calibrator.scale, calibrator.weights)):
            raise ValueError(f"{path}: features {unknown or calibrator.features} do not match their weights "
                             f"or are not kblam signals {SIGNALS}")
        values = [*calibrator.mean, *calibrator.scale, *calibrator.weights, calibrator.bias, calibrator.threshold]
        if not all(math.isfinite(v) for v in values) or not 0.0 <= calibrator.threshold <= 1.0:
            raise ValueError(f"{path}: weights must be finite and the threshold in [0, 1]")
        return calibrator


def reliability(probs: Sequence[float], labels: Sequence[bool], bins: int = 10) -> tuple[float, list[dict]]:
    """(expected calibration error, per-bin mean confidence / accuracy / count) over equal-width bins."""
    table = []
    ece, n = 0.0, max(len(probs), 1)
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        members = [(p, y) for p, y in zip(probs, labels, strict=True) if lo <= p < hi or (k == bins - 1 and p == 1.0)]
        if not members:
            continue
        conf = sum(p for p, _ in members) / len(members)
        acc = sum(bool(y) for _, y in members) / len(members)
        ece += len(members) / n * abs(conf - acc)
        table.append({"lo": lo, "hi": hi, "confidence": conf, "accuracy": acc, "count": len(members)})
    return ece, table
