"""Fit an adapter's answer confidence on VALIDATION KBs and choose its refusal threshold (`kblam calibrate`).

Validation data never overlaps what `kblam eval` reports: the synthetic train split (entities that the
test split never has) and the validation real-fact KBs (kb_builders.real_kbs: countries, US states),
whose wordings are their own. Every question is answered once with min_confidence=0 and its signals
kept (kblam.training.answer_eval); the calibrator is fitted to P(the answer states the asked value),
label 1 for a simple question answered with its value, 0 for an unknown (or a wrong answer).

The threshold is the one with the highest refusal recall on validation unknowns among those whose
false refusals stay within `max_false_refusals` of the answerable questions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from kblam.confidence import SIGNALS, Calibrator, reliability
from kblam.training import answer_eval

VALIDATION = ("synthetic-train", "countries", "us_states")


def labelled(records: Sequence[answer_eval.Record]) -> tuple[list[dict], list[bool]]:
    rows, labels = [], []
    for r in records:
        if r.item.kind == "simple":
            rows.append(r.signals)
            labels.append(not r.refused_by_model and answer_eval.states(r.text, r.item.facts[0].value, r.item.mention))
        elif r.item.kind in answer_eval.UNKNOWN_KINDS:
            rows.append(r.signals)
            labels.append(False)
    return rows, labels


def curve(records: Sequence[answer_eval.Record], thresholds: Sequence[float]) -> list[dict]:
    """Per threshold: refusal recall on unknowns, false refusals of simple questions, refusal precision."""
    simple = [r for r in records if r.item.kind == "simple"]
    unknown = [r for r in records if r.item.kind in answer_eval.UNKNOWN_KINDS]
    out = []
    for t in thresholds:
        refused_unknown = sum(r.refused(t) for r in unknown)
        refused_simple = sum(r.refused(t) for r in simple)
        refused = refused_unknown + refused_simple
        out.append({
            "threshold": t,
            "refusal_recall": refused_unknown / max(len(unknown), 1),
            "false_refusals": refused_simple / max(len(simple), 1),
            "refusal_precision": refused_unknown / refused if refused else float("nan"),
        })
    return out


def choose_threshold(points: Sequence[dict], max_false_refusals: float) -> dict:
    allowed = [p for p in points if p["false_refusals"] <= max_false_refusals]
    if not allowed:
        return min(points, key=lambda p: p["false_refusals"])
    return max(allowed, key=lambda p: (p["refusal_recall"], -p["threshold"]))


def calibrate(model, *, names: Sequence[str] = VALIDATION, sizes: Sequence[int] = (100, 1000, 10000), kbs: int = 2,
              seed: int = 777, max_false_refusals: float = 0.05, features: Sequence[str] = SIGNALS,
              records: Sequence[answer_eval.Record] | None = None, log=print) -> tuple[Calibrator, list]:
    """Fit model.calibrator on validation records (asked now unless given); returns it and the records."""
    if records is None:
        # Asked as a calibrated adapter answers (the null slot's refusal blocked: the decision is the
        # calibrator's), through a stand-in that is sure of everything.
        model.calibrator = Calibrator([], [], [], [], bias=20.0, threshold=0.0)
        records = answer_eval.evaluate(model, names, sizes, kbs=kbs, seed=seed, multi=0, opened=0, log=log)
    rows, labels = labelled(records)
    calibrator = Calibrator.fit(rows, labels, features=features)
    confidences = calibrator.confidence([r.signals for r in records])
    for r, c in zip(records, confidences, strict=True):
        r.confidence = c
    points = curve(records, [k / 100 for k in range(0, 100)])
    best = choose_threshold(points, max_false_refusals)
    calibrator.threshold = best["threshold"]
    ece, bins = reliability(calibrator.confidence(rows), labels)
    calibrator.report = {
        "validation": {"datasets": list(names), "sizes": list(sizes), "kbs": kbs, "seed": seed,
                       "questions": len(rows)},
        "ece": ece, "reliability": bins, "max_false_refusals": max_false_refusals,
        "at_threshold": best, "curve": points[::5],
    }
    model.calibrator = calibrator
    log(f"calibrated on {len(rows)} validation questions: ECE {ece:.3f}; threshold {best['threshold']:.2f} "
        f"(refusal recall {best['refusal_recall']:.2f}, false refusals {best['false_refusals']:.2f})")
    return calibrator, list(records)


def plot(calibrator: Calibrator, path: str | Path) -> Path:
    """Reliability diagram and refusal precision/recall curve of the validation fit, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = calibrator.report
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    bins = report["reliability"]
    left.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    left.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=0.09, alpha=0.6,
             label="share of right answers")
    left.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="C1",
              label="mean confidence")
    left.set(xlabel="confidence", ylabel="answers that state the value", xlim=(0, 1), ylim=(0, 1),
             title=f"reliability (validation), ECE {report['ece']:.3f}")
    left.legend(loc="upper left", fontsize=8)
    points = [p for p in report["curve"] if not math.isnan(p["refusal_precision"])]
    right.plot([p["refusal_recall"] for p in points], [p["refusal_precision"] for p in points], "o-", markersize=3)
    chosen = report["at_threshold"]
    right.plot([chosen["refusal_recall"]], [chosen["refusal_precision"]], "r*", markersize=12,
               label=f"threshold {chosen['threshold']:.2f}")
    right.set(xlabel="refusal recall (unknowns refused)", ylabel="refusal precision", xlim=(0, 1.02),
              ylim=(0, 1.02), title="refusing below a threshold (validation)")
    right.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
