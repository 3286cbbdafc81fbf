"""The benchmark machinery without the default model: metrics, the real and counterfactual KBs, the
baselines' prompts (ICL overflow, RAG retrieval), the cost fits, and the figures and report from results."""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import HashEncoder, tiny_tokenizer

from kblam.kb import Triple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import baselines  # noqa: E402
import cost  # noqa: E402
import quality  # noqa: E402

# --------------------------------------------------------------------------- ROUGE-L

@pytest.mark.parametrize(("candidate", "reference", "expected"), [
    ("The symbol of Gold is Au.", "The symbol of Gold is Au.", 1.0),
    ("the symbol of gold is au", "The Symbol of Gold is Au!", 1.0),  # case and punctuation normalised
    ("the cat on the mat", "the cat sat on the mat", 10 / 11),  # LCS 5: P 1, R 5/6
    ("a b c d", "d c b a", 0.25),  # LCS 1
    ("x y z", "a b c", 0.0),
    ("", "a b c", 0.0),
    ("police killed the gunman", "police kill the gunman", 0.75),  # the classic example: LCS 3 of 4
])
def test_rouge_l_known_values(candidate, reference, expected):
    assert quality.rouge_l(candidate, reference) == pytest.approx(expected)


def test_rouge_l_is_symmetric_in_f1():
    a, b = "the year of discovery of chlorine is 1774", "chlorine was discovered in 1774"
    assert quality.rouge_l(a, b) == pytest.approx(quality.rouge_l(b, a))


# --------------------------------------------------------------------------- real facts

def test_real_facts_kb_builds_deterministically():
    real_facts = pytest.importorskip("kb_builders.real_facts")
    kb = real_facts.countries_kb()
    triples = list(kb)
    assert len(triples) >= 200
    assert not kb.report.conflicts and kb.report.duplicates == 0
    assert Triple("France", "alpha-3 code", "FRA") in triples
    assert Triple("France", "alpha-2 code", "FR") in triples
    assert Triple("Euro", "currency code", "EUR") in triples
    assert list(real_facts.countries_kb()) == triples


def _by_property(triples):
    groups = defaultdict(list)
    for t in triples:
        groups[t.property].append(t)
    return groups


def test_counterfactual_is_a_deterministic_derangement_within_each_property():
    real_facts = pytest.importorskip("kb_builders.real_facts")
    triples = real_facts.country_triples()
    swapped = real_facts.counterfactual(triples, seed=0)
    assert [(t.name, t.property) for t in swapped] == [(t.name, t.property) for t in triples]
    assert all(s.value != t.value for s, t in zip(swapped, triples, strict=True))  # nobody keeps its value
    original, new = _by_property(triples), _by_property(swapped)
    for prop in original:  # values only move within their property
        assert Counter(t.value for t in new[prop]) == Counter(t.value for t in original[prop])
    assert real_facts.counterfactual(triples, seed=0) == swapped  # deterministic
    assert real_facts.counterfactual(triples, seed=1) != swapped


def test_counterfactual_handles_small_and_repeated_values():
    from kb_builders.real_facts import counterfactual

    triples = [Triple("a", "colour", "red"), Triple("b", "colour", "red"), Triple("c", "colour", "blue"),
               Triple("d", "colour", "blue"), Triple("a", "only", "x")]
    swapped = counterfactual(triples, seed=3)
    assert len(swapped) == 4  # the single-entity property cannot be swapped: left out
    assert all(s.value != t.value for s, t in zip(swapped, triples[:4], strict=True))
    with pytest.raises(ValueError, match="cannot derange"):
        counterfactual([Triple("a", "p", "v"), Triple("b", "p", "v")])


# --------------------------------------------------------------------------- baselines

def _facts(n):
    return [Triple(f"Entity {i}", "colour", f"shade {i}") for i in range(n)]


def test_icl_prompt_overflow_is_detected_not_truncated():
    icl = baselines.ICLBaseline(None, tiny_tokenizer(), max_new_tokens=8, context_limit=400)
    questions = ["What is the colour of Entity 1?", "What is the colour of Entity 0?"]
    prefix, rests = icl.check(questions, _facts(3))  # fits
    text = icl.tokenizer.decode(prefix + rests[0])
    assert all(baselines.fact_line(t) in text for t in _facts(3))
    whole = icl.chat(icl.user_message(questions[0], _facts(3)))
    assert whole.endswith("What is the colour of Entity 1?\nAnswer:")  # no chat template: the plain form
    assert prefix + rests[0] == icl.tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert len(prefix) + max(len(r) for r in rests) + 8 <= 400
    with pytest.raises(baselines.ContextOverflow) as err:
        icl.check(questions, _facts(40))
    assert err.value.status == "exceeds context 400"
    assert err.value.tokens > 400
    assert icl.prompt_tokens(_facts(40), questions[0]) + 8 == err.value.tokens


def test_icl_prefix_is_shared_and_rag_uses_only_retrieved_facts():
    icl = baselines.ICLBaseline(None, tiny_tokenizer(), context_limit=None)
    a_prefix, _ = icl.split_prompt("Q one?", _facts(5))
    b_prefix, _ = icl.split_prompt("Another question?", _facts(5))
    assert a_prefix == b_prefix
    zero = baselines.ZeroShotBaseline(None, tiny_tokenizer())
    assert zero.refusal in zero.user_message("Q?", None) and "Facts" not in zero.user_message("Q?", None)


def test_rag_retrieves_the_triple_whose_key_equals_the_query():
    from kblam.encoder import KBEncoder

    kb = [Triple(f"Entity {i}", prop, f"value {i}") for i in range(12) for prop in ("colour", "size")]
    rag = baselines.RAGBaseline(None, None, KBEncoder(HashEncoder(), name="test/hash"), k=5)
    for j in (0, 7, 23):
        retrieved = rag.retrieve([kb[j].key_text()], kb)[0]
        assert len(retrieved) == 5 and retrieved[0] == kb[j]
    several = rag.retrieve([kb[3].key_text(), kb[4].key_text()], kb, k=1)
    assert several == [[kb[3]], [kb[4]]]


# --------------------------------------------------------------------------- tallies and fits

def test_cell_metrics():
    t1, t2, absent = Triple("A", "colour", "red"), Triple("B", "colour", "blue"), Triple("C", "colour", "green")
    cell = quality.Cell("synthetic", "rag", 2)
    refusal = "I'm sorry, I cannot find that in the knowledge base."
    cell.add(quality.Item("q1", t1, True), "The colour of A is red.", [t1, t2], refusal)
    cell.add(quality.Item("q2", t2, True), refusal, [t1, t2], refusal)
    cell.add(quality.Item("q3", absent, False), refusal, [t1], refusal)
    cell.add(quality.Item("q4", absent, False), "The colour of C is red.", [t1], refusal)
    cell.kbs = 1
    row = cell.row()
    assert row["top1"] == 0.5 and row["top5"] == 1.0 and row["contains"] == 0.5
    assert row["rouge_l"] == pytest.approx(0.5 * (1.0 + quality.rouge_l(refusal, "The colour of B is blue.")), abs=1e-4)
    assert row["refusal_precision"] == 0.5 and row["refusal_recall"] == 0.5
    icl = quality.Cell("synthetic", "icl", 2)
    icl.add(quality.Item("q1", t1, True), "red", None, refusal)
    assert icl.row()["top1"] is None and icl.row()["top5"] is None


def test_linear_fit_and_icl_capacity():
    fit = cost.linear_fit([10, 100, 1000], [5 + 2 * x for x in (10, 100, 1000)])
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(5) and fit["r2"] == pytest.approx(1)
    assert cost.linear_fit([10], [1]) is None
    runs = [{"method": "icl", "size": s, "status": "ok", "prompt_tokens": 100 + 15 * s} for s in (10, 100)]
    assert cost.icl_capacity(runs, 8192, 16) == (8192 - 16 - 100) // 15


def test_real_sets_share_questions_and_hold_out_absent_triples():
    pytest.importorskip("pycountry")
    (real_kb, real_items), (cf_kb, cf_items) = quality.real_sets(30, seed=5, unanswerable=0.2)
    assert [i.question for i in real_items] == [i.question for i in cf_items]
    kb_keys = {(t.name, t.property) for t in real_kb}
    for item in real_items:
        assert ((item.triple.name, item.triple.property) in kb_keys) == item.answerable
    for item, cf in zip(real_items, cf_items, strict=True):
        if item.answerable:
            assert cf.triple in cf_kb and cf.original == item.triple and cf.triple.value != item.triple.value


# --------------------------------------------------------------------------- figures and report

def _fake_results(folder: Path) -> None:
    machine = {"platform": "Linux", "processor": "test CPU", "cpus": 2, "torch": "2", "torch_threads": 2,
               "dtype": "float32", "python": "3.11"}
    rows = []
    for size in (10, 100, 1000):
        for method in ("kblam", "icl", "rag", "zero-shot"):
            over = method == "icl" and size == 1000
            rows.append({"dataset": "synthetic", "method": method, "size": size,
                         "status": "exceeds context 8192" if over else "ok", "kbs": 2, "questions": 20,
                         "answerable": 16, "unanswerable": 4, "top1": 0.9 if method in ("kblam", "rag") else None,
                         "top5": 1.0 if method in ("kblam", "rag") else None, "contains": 0.5, "rouge_l": 0.6,
                         "refusal_precision": 0.8, "refusal_recall": 0.7, "seconds": 3.0,
                         "examples": [{"question": "q?", "answer": "a | b", "gold": "a"}]})
    for dataset in ("real", "counterfactual"):
        rows.append({"dataset": dataset, "method": "kblam", "size": 1148, "status": "ok", "kbs": 1,
                     "questions": 40, "answerable": 32, "unanswerable": 8, "top1": 0.9, "top5": 1.0,
                     "contains": 0.6, "rouge_l": 0.7, "refusal_precision": None, "refusal_recall": 0.0,
                     "seconds": 9.0, "contains_original": 0.1 if dataset == "counterfactual" else None,
                     "examples": []})
    settings = {"sizes": [10, 100, 1000], "kbs": 2, "kbs_at_10000_plus": 1, "questions_per_kb": 20,
                "real_questions": 40, "unanswerable": 0.2, "max_new_tokens": 32}
    quality_json = {"meta": {"command": "benchmarks/quality.py --quick", "quick": True, "wall_seconds": 1.0,
                             "adapter": {"path": "x", "trained": True, "steps": 1, "kb_layers": [0]},
                             "machine": machine, "settings": settings},
                    "results": rows,
                    "attention_map": {"triples": ["a | p | v", "b | p | w"], "questions": ["q1?", "q2?"],
                                      "asked": [0, 1], "answers": ["v", "w"], "scores": [[0.9, 0.1], [0.2, 0.8]]}}
    runs = [{"method": "zero-shot", "size": 0, "status": "ok", "ttft_s": 0.2, "tokens_per_s": 20.0,
             "peak_rss_mb": 900.0}]
    for size in (10, 1000, 100000):
        runs.append({"method": "kblam", "size": size, "status": "ok", "ttft_s": 0.2 + size * 1e-5,
                     "tokens_per_s": 18.0, "peak_rss_mb": 1100 + size * 0.01, "kb_encode_s": size / 300,
                     "encode_extrapolated": size > 1000})
    runs.append({"method": "icl", "size": 10, "status": "ok", "ttft_s": 0.5, "tokens_per_s": 20.0,
                 "peak_rss_mb": 950.0, "prompt_tokens": 250, "kb_prep_s": 0.001})
    runs.append({"method": "icl", "size": 1000, "status": "exceeds context 8192", "prompt_tokens": 15000})
    runs.append({"method": "icl", "size": 100000, "status": "exceeds context 8192", "skipped": True})
    cost_json = {"meta": {"command": "benchmarks/cost.py --quick", "quick": True, "wall_seconds": 1.0,
                          "adapter": "x", "machine": machine,
                          "settings": {"sizes": [10, 1000, 100000], "repeats": 1, "new_tokens": 16,
                                       "timeout_s": 300, "encode_cap": 1000, "context_window": 8192}},
                 "encoding": {"measured": [{"triples": 10, "keys_s": 0.05, "values_s": 0.04, "triples_per_s": 110}]},
                 "runs": runs, "slopes": cost.slopes(runs), "icl_fits_up_to_triples": 500}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quality.json").write_text(json.dumps(quality_json))
    (folder / "cost.json").write_text(json.dumps(cost_json))


def test_plots_and_report_from_results(tmp_path):
    pytest.importorskip("matplotlib")
    import plots
    import report

    _fake_results(tmp_path / "results")
    written = plots.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "img")])
    assert {p.name for p in written} == {"quality_vs_size.png", "quality_real.png", "cost_vs_size.png",
                                          "attention_heatmap.png"}
    assert all(p.stat().st_size > 1000 for p in written)
    out = report.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "benchmarks.md")])
    text = out.read_text()
    assert "test CPU, 2 CPUs" in text and "benchmarks/quality.py --quick" in text
    assert "exceeds context 8192" in text and "a \\| b" in text
    assert "img/cost_vs_size.png" in text and "| kblam | 10, 1,000, 100,000 | +10.2 KB (1.000) |" in text
