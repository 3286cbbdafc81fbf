"""kblam.kb: Triple, KnowledgeBase editing/reading, reports, save/load."""

from __future__ import annotations

import json
import os
import pickle
import stat
import warnings

import pytest

from kblam.kb import Conflict, KBFormatError, KnowledgeBase, LoadReport, Triple

FACTS = [
    ("Iron", "symbol", "Fe"),
    ("Iron", "atomic number", "26"),
    ("Gold", "symbol", "Au"),
    ("Neon", "category", "noble gas"),
]


@pytest.fixture
def kb() -> KnowledgeBase:
    return KnowledgeBase(FACTS, source="facts")


# ---------------------------------------------------------------- Triple


def test_triple_texts_and_str():
    t = Triple("Iron", "symbol", "Fe")
    assert t.key_text() == "The symbol of Iron"
    assert t.value_text() == "Fe"
    assert str(t) == "Iron | symbol | Fe"


def test_triple_normalises_whitespace_and_numbers():
    assert Triple("  Iron ", "\tsymbol", " Fe\n") == Triple("Iron", "symbol", "Fe")
    assert Triple("Iron", "atomic number", 26).value == "26"
    assert Triple("Iron", "magnetic", True).value == "True"
    assert Triple("Iron", "density", 7.874).value == "7.874"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("", "symbol", "Fe"), "empty 'name' field"),
        (("Iron", "   ", "Fe"), "empty 'property' field"),
        (("Iron", "symbol", None), "missing 'value'"),
        (("Iron", "symbol", float("nan")), "missing 'value' (it is NaN)"),
        ((["Iron"], "symbol", "Fe"), "'name' must be a string, got list"),
        (("Iron", {"a": 1}, "Fe"), "'property' must be a string, got dict"),
        ((26, "symbol", "Fe"), "'name' must be a string, got int"),
        (("Iron", "symbol", ["Fe"]), "'value' must be a string, number or boolean, got list"),
    ],
)
def test_triple_rejects_bad_fields(args, reason):
    with pytest.raises(KBFormatError) as info:
        Triple(*args)
    assert reason in str(info.value)
    assert info.value.path is None and info.value.line is None


def test_triple_is_frozen_and_hashable():
    t = Triple("Iron", "symbol", "Fe")
    with pytest.raises(AttributeError):
        t.value = "Au"  # type: ignore[misc]
    assert len({t, Triple("Iron", "symbol", "Fe")}) == 1


def test_kbformaterror_message_and_attributes():
    err = KBFormatError("empty 'value' field", path="facts.csv", line=7)
    assert str(err) == "facts.csv, line 7: empty 'value' field"
    assert (err.path, err.line, err.reason) == ("facts.csv", 7, "empty 'value' field")
    assert isinstance(err, ValueError)
    assert str(KBFormatError("file is empty", path="x.json")) == "x.json: file is empty"
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.line) == (str(err), 7)


# ------------------------------------------------------- construction/reading


def test_construction_keeps_order_and_exposes_views(kb):
    assert len(kb) == 4
    assert [t.name for t in kb] == ["Iron", "Iron", "Gold", "Neon"]
    assert kb[0] == Triple("Iron", "symbol", "Fe")
    assert kb[-1].value == "noble gas"
    assert kb[1:3] == (Triple("Iron", "atomic number", "26"), Triple("Gold", "symbol", "Au"))
    assert kb.triples == tuple(Triple(*f) for f in FACTS)
    assert kb.names == ["Iron", "Gold", "Neon"]
    assert kb.properties == ["symbol", "atomic number", "category"]
    assert Triple("Gold", "symbol", "Au") in kb
    assert ("Gold", "symbol", "Au") in kb
    assert Triple("Gold", "symbol", "Ag") not in kb
    assert "Gold" not in kb
    assert repr(kb) == "KnowledgeBase(4 triples, source='facts')"
    assert kb.to_records()[0] == {"name": "Iron", "property": "symbol", "value": "Fe"}


def test_construction_validates_like_loaders():
    with pytest.raises(KBFormatError, match=r"<triples>, item 2: empty 'value' field"):
        KnowledgeBase([("a", "b", "c"), ("a", "b", " ")])
    with pytest.raises(KBFormatError, match=r"item 1: expected a Triple .*from_records"):
        KnowledgeBase([{"name": "a", "property": "b", "value": "c"}])
    assert KnowledgeBase([(" a ", "b", 3)])[0] == Triple("a", "b", "3")


def test_empty_kb():
    kb = KnowledgeBase()
    assert len(kb) == 0 and list(kb) == [] and kb.names == []
    assert kb.report.triples == 0
    assert repr(kb) == "KnowledgeBase(0 triples)"


def test_equality_is_by_triples_in_order(kb):
    assert kb == KnowledgeBase(FACTS)
    assert kb != KnowledgeBase(list(reversed(FACTS)))
    assert kb != FACTS


def test_get(kb):
    assert kb.get("Iron", "symbol") == [Triple("Iron", "symbol", "Fe")]
    assert kb.get(" Iron ", "symbol ") == [Triple("Iron", "symbol", "Fe")]
    assert kb.get("Iron", "colour") == []


# --------------------------------------------------- duplicates and conflicts


def test_duplicates_are_merged_counted_and_warned():
    with pytest.warns(UserWarning, match="merged 2 exact duplicate"):
        kb = KnowledgeBase(FACTS + [("Iron", "symbol", "Fe"), (" Iron", "symbol ", "Fe")])
    assert len(kb) == 4
    report = kb.report
    assert report.duplicates == 2
    assert report.rows_read == 6
    triple, locations = report.duplicate_examples[0]
    assert triple == Triple("Iron", "symbol", "Fe")
    assert locations == ["<triples>#1", "<triples>#5", "<triples>#6"]
    assert "exact duplicates merged: 2" in report.summary()


def test_conflicts_are_kept_and_reported():
    with pytest.warns(UserWarning, match="conflicting"):
        kb = KnowledgeBase(FACTS + [("Iron", "symbol", "Fx")])
    assert len(kb) == 5
    assert [t.value for t in kb.get("Iron", "symbol")] == ["Fe", "Fx"]
    (conflict,) = kb.report.conflicts
    assert conflict == Conflict("Iron", "symbol", ["Fe", "Fx"], ["<triples>#1", "<triples>#5"])
    assert "Iron | symbol: 'Fe' (<triples>#1), 'Fx' (<triples>#5)" in kb.report.summary()


def test_strict_rejects_conflicts_but_not_duplicates():
    with pytest.raises(KBFormatError, match=r"(?s)1 conflicting fact.*Iron \| symbol: 'Fe'.*'Fx'"):
        KnowledgeBase(FACTS + [("Iron", "symbol", "Fx")], strict=True)
    with pytest.warns(UserWarning):
        kb = KnowledgeBase(FACTS + [FACTS[0]], strict=True)
    assert len(kb) == 4


def test_names_compare_case_sensitively():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no duplicate/conflict warning expected
        kb = KnowledgeBase([("iron", "symbol", "Fe"), ("Iron", "symbol", "fe")])
    assert len(kb) == 2 and kb.report.conflicts == []


def test_clean_load_emits_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KnowledgeBase(FACTS)


# ------------------------------------------------------------------ editing


def test_add(kb):
    added = kb.add("Gold", "atomic number", 79)
    assert added == Triple("Gold", "atomic number", "79")
    assert kb[-1] == added and len(kb) == 5
    assert kb.add(Triple("Xenon", "symbol", "Xe")) == kb[5]
    assert kb.add(("Argon", "symbol", "Ar")).name == "Argon"


def test_add_duplicate_is_not_added_but_counted(kb):
    assert kb.add(" Iron", "symbol", "Fe ") == Triple("Iron", "symbol", "Fe")
    assert len(kb) == 4
    assert kb.report.duplicates == 1
    assert kb.report.rows_read == 5


def test_add_conflict_is_kept_unless_strict(kb):
    kb.add("Iron", "symbol", "Fx")
    assert len(kb.report.conflicts) == 1
    strict = KnowledgeBase(FACTS, strict=True)
    with pytest.raises(KBFormatError, match="conflicts with existing value.*'Fe'.*update"):
        strict.add("Iron", "symbol", "Fx")
    assert len(strict) == 4


def test_add_argument_errors(kb):
    with pytest.raises(TypeError):
        kb.add("Iron")
    with pytest.raises(TypeError):
        kb.add(Triple("a", "b", "c"), "extra")
    with pytest.raises(KBFormatError, match="empty 'value'"):
        kb.add("Iron", "colour", "")


def test_remove_single_triple_keeps_order(kb):
    assert kb.remove("Iron", "atomic number", "26") == 1
    assert [t.value for t in kb] == ["Fe", "Au", "noble gas"]
    assert kb[1] == Triple("Gold", "symbol", "Au")


def test_remove_by_triple_property_and_entity(kb):
    assert kb.remove(Triple("Gold", "symbol", "Au")) == 1
    assert kb.remove("Iron") == 2
    assert kb.names == ["Neon"]
    kb.add("Neon", "category", "gas")
    assert kb.remove("Neon", "category") == 2
    assert len(kb) == 0


def test_remove_missing_raises_helpful_keyerror(kb):
    with pytest.raises(KeyError) as info:
        kb.remove("Irn")
    assert "no entity named 'Irn'" in str(info.value) and "did you mean 'Iron'" in str(info.value)
    with pytest.raises(KeyError, match="'Iron' has no property 'colour'.*'symbol'"):
        kb.remove("Iron", "colour")
    with pytest.raises(KeyError, match="has no value 'Au'.*'Fe'"):
        kb.remove("Iron", "symbol", "Au")
    assert len(kb) == 4


def test_update_replaces_value_in_place(kb):
    new = kb.update("Iron", "atomic number", 27)
    assert new == Triple("Iron", "atomic number", "27")
    assert kb[1] == new and len(kb) == 4
    assert kb.get("Iron", "atomic number") == [new]


def test_update_collapses_conflicts(kb):
    kb.add("Gold", "symbol", "Ag")
    kb.add("Xenon", "symbol", "Xe")
    kb.add("Gold", "symbol", "Gd")
    assert len(kb.report.conflicts) == 1
    kb.update("Gold", "symbol", "Au")
    assert kb.get("Gold", "symbol") == [Triple("Gold", "symbol", "Au")]
    assert [t.name for t in kb] == ["Iron", "Iron", "Gold", "Neon", "Xenon"]
    assert kb.report.conflicts == []


def test_update_missing_raises_keyerror(kb):
    with pytest.raises(KeyError, match="'Gold' has no property 'colour'"):
        kb.update("Gold", "colour", "yellow")


def test_iteration_is_over_a_snapshot(kb):
    for t in kb:
        if t.name == "Iron":
            kb.remove(t)
    assert kb.names == ["Gold", "Neon"]


def test_report_is_a_snapshot(kb):
    report = kb.report
    assert isinstance(report, LoadReport)
    report.problems.append("x")
    assert kb.report.problems == []


# ------------------------------------------------------------------ saving


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv"])
def test_save_load_round_trip(tmp_path, suffix):
    tricky = FACTS + [
        ("Café, Paris", "motto", 'say "bonjour"; ok | fine'),
        ("Line", "text", "two\nlines"),
        ("Ünïcödé", "script", "漢字"),
    ]
    kb = KnowledgeBase(tricky)
    path = tmp_path / f"kb{suffix}"
    kb.save(path)
    loaded = KnowledgeBase.load(path)
    assert loaded == kb
    assert loaded.source == str(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_save_formats(tmp_path, kb):
    kb.save(tmp_path / "a.jsonl")
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"name": "Iron", "property": "symbol", "value": "Fe"}
    assert len(lines) == 4
    kb.save(tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))[2]["value"] == "Au"
    kb.save(tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_text(encoding="utf-8").splitlines()[:2] == [
        "name,property,value",
        "Iron,symbol,Fe",
    ]


def test_save_overwrites_atomically_with_normal_permissions(tmp_path, kb):
    path = tmp_path / "kb.jsonl"
    path.write_text("old", encoding="utf-8")
    os.chmod(path, 0o640)
    kb.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert KnowledgeBase.load(path) == kb
    fresh = tmp_path / "fresh.json"
    kb.save(fresh)
    assert stat.S_IMODE(os.stat(fresh).st_mode) & 0o044  # not the 0600 of a temp file


def test_save_unknown_suffix(tmp_path, kb):
    with pytest.raises(KBFormatError, match=r"kb\.xlsx: cannot save as '\.xlsx'"):
        kb.save(tmp_path / "kb.xlsx")
    assert list(tmp_path.iterdir()) == []


def test_kb_module_is_light():
    # Load kb.py on its own (not via kblam/__init__) and check it pulls in nothing heavy or circular.
    import subprocess
    import sys

    import kblam.kb

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('kbonly', {kblam.kb.__file__!r})\n"
        "module = sys.modules['kbonly'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted(m for m in ('torch', 'datasets', 'kb_builders', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
