"""kb_builders: CSV, JSON, JSONL, records, datasets, suffix dispatch, inspect."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from conftest import format_error, write_file

from kb_builders import (
    SUPPORTED_SUFFIXES,
    format_inspect,
    inspect_file,
    load_csv,
    load_dataset_kb,
    load_file,
)
from kblam.kb import KBFormatError, KnowledgeBase, Triple

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

IRON = [Triple("Iron", "symbol", "Fe"), Triple("Iron", "atomic number", "26"), Triple("Gold", "symbol", "Au")]


# ------------------------------------------------------------------- CSV


def test_csv_basic(tmp_path):
    path = write_file(tmp_path, "facts.csv", "name,property,value\nIron,symbol,Fe\nIron,atomic number,26\nGold,symbol,Au\n")
    kb = KnowledgeBase.from_csv(path)
    assert list(kb) == IRON
    assert kb.report.rows_read == 3 and kb.report.problems == []


@pytest.mark.parametrize(
    "header",
    [
        "name,property,value",
        "Entity,Relation,Object",
        "SUBJECT,predicate,tail",
        "head,attribute,answer",
        "s,p,o",
        " Name , relationship , Value ",
        "entity,key,value",
    ],
)
def test_csv_header_aliases(tmp_path, header):
    path = write_file(tmp_path, "facts.csv", f"{header}\nIron,symbol,Fe\nIron,atomic number,26\nGold,symbol,Au\n")
    assert list(KnowledgeBase.from_csv(path)) == IRON


def test_csv_columns_override_and_reordered_columns(tmp_path):
    path = write_file(tmp_path, "c.csv", "Fact,Country,Capital Of\ncapital,France,Paris\n")
    kb = KnowledgeBase.from_csv(path, columns={"name": "country", "property": "Fact", "value": "Capital Of"})
    assert list(kb) == [Triple("France", "capital", "Paris")]


def test_csv_extra_columns_are_ignored_and_noted(tmp_path):
    path = write_file(tmp_path, "x.csv", "id,name,property,value,notes\n1,Iron,symbol,Fe,checked\n")
    kb = KnowledgeBase.from_csv(path)
    assert list(kb) == [Triple("Iron", "symbol", "Fe")]
    assert kb.report.problems == ["ignored extra column(s): 'id', 'notes'"]


def test_csv_ambiguous_aliases_use_priority_and_note_it(tmp_path):
    path = write_file(tmp_path, "x.csv", "subject,name,property,value\nx,Iron,symbol,Fe\n")
    kb = KnowledgeBase.from_csv(path)
    assert kb[0].name == "Iron"
    assert any("could all be the 'name' column" in p for p in kb.report.problems)


def test_csv_utf8_bom(tmp_path):
    path = write_file(tmp_path, "bom.csv", "\ufeffname,property,value\nZürich,country,Schweiz\n")
    assert list(KnowledgeBase.from_csv(path)) == [Triple("Zürich", "country", "Schweiz")]
    # An explicit utf-8 (which keeps the BOM) must not corrupt the first header either.
    assert len(KnowledgeBase.from_csv(path, encoding="utf-8")) == 1


@pytest.mark.parametrize(("delimiter", "name"), [(";", "semi.csv"), ("\t", "tabs.csv"), ("|", "pipes.txt")])
def test_csv_sniffed_delimiters(tmp_path, delimiter, name):
    rows = ["name,property,value".split(","), ["Iron", "symbol", "Fe"], ["Paris", "motto", "Fluctuat, nec mergitur"]]
    path = write_file(tmp_path, name, "".join(delimiter.join(r) + "\n" for r in rows))
    kb = KnowledgeBase.from_file(path)
    assert kb[1].value == "Fluctuat, nec mergitur"


def test_tsv_suffix_defaults_to_tab_and_explicit_delimiter_wins(tmp_path):
    path = write_file(tmp_path, "facts.tsv", "name\tproperty\tvalue\nIron\tsymbol\tFe, iron\n")
    assert KnowledgeBase.from_file(path)[0].value == "Fe, iron"
    path = write_file(tmp_path, "odd.csv", "name:property:value\nIron:symbol:Fe\n")
    assert KnowledgeBase.from_csv(path, delimiter=":")[0] == Triple("Iron", "symbol", "Fe")


def test_csv_quoted_fields_and_blank_lines(tmp_path):
    text = 'name,property,value\n\nIron,motto,"strong, ""hard"""\nText,body,"a\nb"\n,,\nGold,symbol,Au\n'
    kb = KnowledgeBase.from_csv(write_file(tmp_path, "q.csv", text))
    assert [t.value for t in kb] == ['strong, "hard"', "a\nb", "Au"]
    assert kb.report.rows_read == 3


def test_csv_explicit_encoding(tmp_path):
    path = write_file(tmp_path, "latin.csv", "name,property,value\nZürich,country,Schweiz\n", encoding="latin-1")
    assert KnowledgeBase.from_csv(path, encoding="latin-1")[0].name == "Zürich"


# ------------------------------------------------------------ CSV errors


def test_csv_empty_field_names_file_line_and_reason(tmp_path):
    path = write_file(tmp_path, "facts.csv", "name,property,value\nIron,symbol,Fe\n\nGold,symbol,\n")
    err = format_error(KnowledgeBase.from_csv, path)
    assert str(err) == f"{path}, line 4: empty 'value' field"
    assert (err.path, err.line, err.reason) == (str(path), 4, "empty 'value' field")


def test_csv_empty_field_names_the_aliased_column(tmp_path):
    path = write_file(tmp_path, "facts.csv", "subject,relation,object\n  ,symbol,Fe\n")
    assert str(format_error(KnowledgeBase.from_csv, path)).endswith("line 2: empty 'name' field (column 'subject')")


def test_csv_line_numbers_count_multiline_quoted_fields(tmp_path):
    text = 'name,property,value\nText,body,"a\nb\nc"\nGold,symbol,\n'
    assert format_error(KnowledgeBase.from_csv, write_file(tmp_path, "m.csv", text)).line == 5


def test_csv_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        KnowledgeBase.from_csv(tmp_path / "nope.csv")


@pytest.mark.parametrize("text", ["", "   \n\n", "\ufeff"])
def test_csv_empty_file(tmp_path, text):
    path = write_file(tmp_path, "empty.csv", text)
    assert str(format_error(KnowledgeBase.from_csv, path)) == f"{path}: file is empty"


def test_csv_header_only(tmp_path):
    path = write_file(tmp_path, "h.csv", "name,property,value\n")
    assert "h.csv: has a header but no data rows" in str(format_error(KnowledgeBase.from_csv, path))


def test_csv_header_missing_columns_lists_found_and_aliases(tmp_path):
    path = write_file(tmp_path, "facts.csv", "entity,colour,shade\nIron,grey,dark\n")
    err = format_error(KnowledgeBase.from_csv, path)
    msg = str(err)
    assert err.line == 1 and "facts.csv, line 1: header missing the 'property' and 'value' columns" in msg
    assert "'entity', 'colour', 'shade'" in msg
    assert "relation, predicate" in msg and "object, tail" in msg and "columns=" in msg


def test_csv_columns_override_not_found(tmp_path):
    path = write_file(tmp_path, "facts.csv", "name,property,value\nIron,symbol,Fe\n")
    err = format_error(KnowledgeBase.from_csv, path, columns={"name": "Country"})
    assert "column 'Country' (given in columns= for 'name') not found" in str(err)
    with pytest.raises(ValueError, match="columns= keys must be among"):
        KnowledgeBase.from_csv(path, columns={"subj": "name"})


@pytest.mark.parametrize(
    ("row", "reason"),
    [("Iron,symbol", "expected 3 fields as in the header, found 2"),
     ("Paris,motto,Fluctuat, nec mergitur", "found 4; a value containing ',' must be in double quotes")],
)
def test_csv_wrong_field_count(tmp_path, row, reason):
    path = write_file(tmp_path, "facts.csv", f"name,property,value\nIron,symbol,Fe\n{row}\n")
    err = format_error(KnowledgeBase.from_csv, path)
    assert err.line == 3 and "facts.csv, line 3: " in str(err) and reason in str(err)


def test_csv_undecodable_bytes(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("name,property,value\nZürich,country,CH\n".encode("latin-1"))
    err = format_error(KnowledgeBase.from_csv, path)
    assert err.line == 2
    assert "cannot decode as UTF-8 (with or without BOM): byte 0xfc at byte offset 21" in str(err)
    assert "encoding=" in str(err)


def test_csv_broken_quoting(tmp_path):
    path = write_file(tmp_path, "q.csv", 'name,property,value\nIron,symbol,"Fe" iron\n')
    err = format_error(KnowledgeBase.from_csv, path)
    assert err.line == 2 and "malformed CSV" in str(err)


# ------------------------------------------- duplicates/conflicts from files


def test_csv_duplicates_counted_with_locations(tmp_path):
    path = write_file(tmp_path, "d.csv", "name,property,value\nIron,symbol,Fe\nGold,symbol,Au\n Iron , symbol ,Fe\n")
    with pytest.warns(UserWarning, match="merged 1 exact duplicate"):
        kb = KnowledgeBase.from_csv(path)
    assert len(kb) == 2
    assert kb.report.duplicates == 1
    assert kb.report.duplicate_examples == [(Triple("Iron", "symbol", "Fe"), ["d.csv:2", "d.csv:4"])]


def test_csv_conflicts_kept_reported_and_strict(tmp_path):
    path = write_file(tmp_path, "c.csv", "name,property,value\nIron,symbol,Fe\nGold,symbol,Au\nIron,symbol,Fx\n")
    with pytest.warns(UserWarning, match="conflicting"):
        kb = KnowledgeBase.from_csv(path)
    assert len(kb) == 3
    (conflict,) = kb.report.conflicts
    assert (conflict.name, conflict.property) == ("Iron", "symbol")
    assert conflict.values == ["Fe", "Fx"] and conflict.locations == ["c.csv:2", "c.csv:4"]
    err = format_error(KnowledgeBase.from_csv, path, strict=True)
    assert "c.csv" in str(err) and "Iron | symbol: 'Fe' (c.csv:2), 'Fx' (c.csv:4)" in str(err)


# ------------------------------------------------------------------ JSON


def test_json_list_of_records_with_aliases(tmp_path):
    records = [
        {"name": "Iron", "property": "symbol", "value": "Fe"},
        {"Entity": "Iron", "relation": "atomic number", "object": 26},
        ["Gold", "symbol", "Au"],
    ]
    kb = KnowledgeBase.from_json(write_file(tmp_path, "f.json", json.dumps(records)))
    assert list(kb) == IRON


def test_json_entity_map_with_list_values(tmp_path):
    data = {"Iron": {"symbol": "Fe", "atomic number": 26}, "Gold": {"symbol": "Au", "alloys": ["electrum", "rose gold"]}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a list value is a deliberate multi-value, not a conflict
        kb = KnowledgeBase.from_json(write_file(tmp_path, "m.json", json.dumps(data)))
    assert list(kb)[:3] == IRON
    assert [t.value for t in kb.get("Gold", "alloys")] == ["electrum", "rose gold"]
    assert kb.report.conflicts == [] and kb.report.rows_read == 4


def test_json_entity_without_properties_is_noted(tmp_path):
    kb = KnowledgeBase.from_json(write_file(tmp_path, "m.json", '{"Iron": {"symbol": "Fe"}, "Gold": {}}'))
    assert len(kb) == 1 and kb.report.problems == ["skipped entities with no properties: 'Gold'"]


def test_json_list_values_in_records_expand(tmp_path):
    path = write_file(tmp_path, "l.json", json.dumps([{"name": "Gold", "property": "alloys", "value": ["a", "b"]}]))
    assert [t.value for t in KnowledgeBase.from_json(path)] == ["a", "b"]


def test_json_repeated_entity_keys_are_not_silently_dropped(tmp_path):
    path = write_file(tmp_path, "r.json", '{"Iron": {"symbol": "Fe"}, "Iron": {"symbol": "Fx"}}')
    with pytest.warns(UserWarning):
        kb = KnowledgeBase.from_json(path)
    assert [t.value for t in kb] == ["Fe", "Fx"] and len(kb.report.conflicts) == 1
    path = write_file(tmp_path, "k.json", '[{"name": "Iron", "name": "Gold", "property": "p", "value": "v"}]')
    assert "record 1: key 'name' appears twice" in str(format_error(KnowledgeBase.from_json, path))


def test_json_record_extra_keys_noted(tmp_path):
    path = write_file(tmp_path, "e.json", json.dumps([{"id": 1, "s": "Iron", "p": "symbol", "o": "Fe"}] * 2))
    with pytest.warns(UserWarning):
        kb = KnowledgeBase.from_json(path)
    assert kb.report.problems == ["ignored extra key(s): 'id' (in 2 records)"]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('[{"name": "Iron", "property": "symbol", "value": ""}]', 1, "record 1: empty 'value' field"),
        ('[{"name": "Iron", "property": "symbol", "value": "Fe"}, {"name": "Gold", "value": "Au"}]', 2,
         "record 2: missing the 'property' key; found keys: 'name', 'value'"),
        ('[{"name": ["Iron"], "property": "symbol", "value": "Fe"}]', 1, "'name' must be a string, got list"),
        ('[{"name": "Iron", "property": "symbol", "value": null}]', 1, "missing 'value' (it is null/None)"),
        ('[{"name": "Iron", "property": "symbol", "value": {"a": 1}}]', 1, "'value' must be a string, number"),
        ('["Iron"]', 1, "record 1: expected a record (dict) or a (name, property, value) sequence, got str"),
        ('{"Iron": {"symbol": ""}}', 1, "entity 1: entity 'Iron', property 'symbol': empty 'value' field"),
        ('{"Iron": "Fe"}', 1, "entity 1: entity 'Iron': expected an object mapping property -> value, got str"),
        ('{"name": "Iron", "property": "symbol", "value": "Fe"}', 1, "must be wrapped in a list"),
        ('[\n  {"name": "Iron",\n   "property": "symbol" "value": "Fe"}\n]', 3,
         "line 3: invalid JSON: Expecting ',' delimiter (column 25)"),
        ('"just a string"', None, "top-level JSON must be a list of records or an object"),
        ("[]", None, "contains no records"),
        ('{"name": "Iron"}\n{"name": "Gold"}\n', 2, "if this is one object per line, use a .jsonl suffix"),
    ],
)
def test_json_errors(tmp_path, text, line, reason):
    path = write_file(tmp_path, "bad.json", text)
    err = format_error(KnowledgeBase.from_json, path)
    assert str(path) in str(err) and reason in str(err)
    assert err.line == line


def test_json_must_be_utf8(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes('[["Zürich", "country", "CH"]]'.encode("latin-1"))
    err = format_error(KnowledgeBase.from_json, path)
    assert "cannot decode as UTF-8" in str(err) and "byte offset 4" in str(err) and "JSON must be UTF-8" in str(err)


# ----------------------------------------------------------------- JSONL


def test_jsonl_records_and_blank_lines(tmp_path):
    lines = ['{"name": "Iron", "property": "symbol", "value": "Fe"}', "", "  ",
             '{"head": "Iron", "relation": "atomic number", "tail": 26}', '["Gold", "symbol", "Au"]']
    kb = KnowledgeBase.from_jsonl(write_file(tmp_path, "f.jsonl", "\r\n".join(lines) + "\n"))
    assert list(kb) == IRON
    assert kb.report.rows_read == 3


@pytest.mark.parametrize(
    ("line", "reason"),
    [('{"name": "Gold", "property": "symbol", "value": "  "}', "empty 'value' field"),
     ('{"name": "Gold", "property": "symbol", "value": "Au"', "invalid JSON: Expecting ',' delimiter (column 53)"),
     ('"Gold"', "expected a record (dict)"),
     ('{"name": "Gold", "value": "Au"}', "missing the 'property' key")],
)
def test_jsonl_errors_name_the_line(tmp_path, line, reason):
    good = '{"name": "Iron", "property": "symbol", "value": "Fe"}'
    path = write_file(tmp_path, "bad.jsonl", f"{good}\n\n{line}\n{good}\n")
    err = format_error(KnowledgeBase.from_jsonl, path)
    assert str(err).startswith(f"{path}, line 3: ") and reason in str(err)


def test_jsonl_conflict_locations(tmp_path):
    path = write_file(tmp_path, "c.jsonl", '["Iron", "symbol", "Fe"]\n["Iron", "symbol", "Fx"]\n')
    err = format_error(KnowledgeBase.from_jsonl, path, strict=True)
    assert "'Fe' (c.jsonl:1), 'Fx' (c.jsonl:2)" in str(err)


# --------------------------------------------------------------- records


def test_records_dicts_tuples_triples():
    kb = KnowledgeBase.from_records(
        [{"subject": "Iron", "predicate": "symbol", "object": "Fe"}, ("Iron", "atomic number", 26), IRON[2]]
    )
    assert list(kb) == IRON and kb.source is None


def test_records_columns_and_errors():
    kb = KnowledgeBase.from_records([{"Country": "France", "Capital": "Paris", "p": "capital"}],
                                    columns={"name": "Country", "value": "Capital"}, source="capitals")
    assert kb[0] == Triple("France", "capital", "Paris") and kb.source == "capitals"
    err = format_error(KnowledgeBase.from_records, [("a", "b", "c"), ("a", "b")], source="mem")
    assert str(err) == "mem, record 2: expected 3 items (name, property, value), got 2"
    err = format_error(KnowledgeBase.from_records, [{"name": "a", "property": "b", "value": ""}])
    assert str(err) == "<records>, record 1: empty 'value' field"


def test_records_strict_conflict():
    with pytest.raises(KBFormatError, match="Iron | symbol"):
        KnowledgeBase.from_records([("Iron", "symbol", "Fe"), ("Iron", "symbol", "Fx")], strict=True)


# -------------------------------------------------------------- datasets


def test_dataset_in_memory_with_aliases_and_extra_columns():
    import datasets

    ds = datasets.Dataset.from_dict({
        "id": [1, 2, 3],
        "subject": ["Iron", "Iron", "Gold"],
        "relation": ["symbol", "atomic number", "symbol"],
        "object": ["Fe", "26", "Au"],
    })
    kb = KnowledgeBase.from_dataset(ds)
    assert list(kb) == IRON
    assert kb.report.problems == ["ignored extra column(s): 'id'"]


def test_dataset_dict_split_and_errors():
    import datasets

    ds = datasets.Dataset.from_dict({"name": ["Iron", "Gold"], "property": ["symbol"] * 2, "value": ["Fe", None]})
    dd = datasets.DatasetDict({"test": ds})
    err = format_error(KnowledgeBase.from_dataset, dd)
    assert "no split 'train'; available splits: test" in str(err)
    err = format_error(KnowledgeBase.from_dataset, dd, split="test")
    assert str(err) == "<dataset>, row 2: missing 'value' (it is null/None)"
    bad = datasets.Dataset.from_dict({"name": ["Iron"], "colour": ["grey"]})
    assert "missing the 'property' and 'value' columns" in str(format_error(load_dataset_kb, bad))


def test_dataset_from_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "facts.parquet"
    pq.write_table(pa.table({"Entity": ["Iron", "Iron", "Gold"], "Property": ["symbol", "atomic number", "symbol"],
                             "Value": ["Fe", "26", "Au"]}), path)
    assert list(KnowledgeBase.from_dataset(path)) == IRON
    kb = KnowledgeBase.from_file(path)
    assert list(kb) == IRON and kb.source == str(path)


def test_dataset_from_local_jsonl_and_cache_left_clean(tmp_path):
    path = write_file(tmp_path, "f.jsonl", "".join(json.dumps(t.to_record()) + "\n" for t in IRON))
    assert list(KnowledgeBase.from_dataset(path)) == IRON
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.jsonl"]


def test_dataset_from_local_csv_keeps_values_as_written(tmp_path):
    path = write_file(tmp_path, "n.csv", "name,property,value\nIron,atomic number,26\nIron,density,7.874\nNA,code,NA\n")
    assert [t.value for t in KnowledgeBase.from_dataset(path)] == ["26", "7.874", "NA"]
    path = write_file(tmp_path, "e.csv", "name,property,value\nIron,atomic number,26\nIron,density,\n")
    assert str(format_error(KnowledgeBase.from_dataset, path)) == f"{path}, row 2: missing 'value' (it is null/None)"


def test_dataset_unreadable_file(tmp_path):
    path = write_file(tmp_path, "bad.parquet", "not parquet at all")
    assert "not a readable parquet file" in str(format_error(KnowledgeBase.from_file, path))


def test_dataset_conflict_locations(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"name": ["Iron", "Iron"], "property": ["symbol"] * 2, "value": ["Fe", "Fx"]})
    with pytest.warns(UserWarning):
        kb = KnowledgeBase.from_dataset(ds)
    assert kb.report.conflicts[0].locations == ["<dataset>#1", "<dataset>#2"]


# ------------------------------------------------------ from_file dispatch


def test_from_file_unknown_suffix(tmp_path):
    path = write_file(tmp_path, "facts.xlsx", "x")
    err = format_error(KnowledgeBase.from_file, path)
    assert "unsupported file type '.xlsx'" in str(err)
    assert all(s in str(err) for s in (".csv", ".tsv", ".json", ".jsonl", ".parquet"))
    assert set(SUPPORTED_SUFFIXES) >= {".csv", ".tsv", ".txt", ".json", ".jsonl", ".ndjson", ".parquet"}


def test_from_file_dispatch(tmp_path):
    records = [t.to_record() for t in IRON]
    write_file(tmp_path, "a.JSON", json.dumps(records))
    write_file(tmp_path, "b.ndjson", "".join(json.dumps(r) + "\n" for r in records))
    for name in ("a.JSON", "b.ndjson"):
        assert list(load_file(tmp_path / name)) == IRON
    assert KnowledgeBase.load(tmp_path / "a.JSON") == KnowledgeBase(IRON)


def test_from_file_directory(tmp_path):
    (tmp_path / "dir.csv").mkdir()
    assert "is a directory" in str(format_error(load_csv, tmp_path / "dir.csv"))


# ------------------------------------------------------------ the example


def test_example_elements_csv():
    kb = KnowledgeBase.from_file(EXAMPLES / "elements.csv", strict=True)
    assert 35 <= len(kb) <= 50
    assert kb.report.duplicates == 0 and kb.report.conflicts == [] and kb.report.problems == []
    assert kb.get("Iron", "symbol") == [Triple("Iron", "symbol", "Fe")]
    assert kb.get("Mercury", "state at room temperature")[0].value == "liquid"
    assert kb.get("Polonium", "year of discovery")[0].value == "1898"


# --------------------------------------------------------------- inspect


def test_inspect_file_reports_counts_duplicates_conflicts(tmp_path):
    text = "name,property,value,notes\nIron,symbol,Fe,\nIron,symbol,Fe,\nIron,symbol,Fx,\nGold,symbol,Au,\nGold,mass,197,\n"
    path = write_file(tmp_path, "facts.csv", text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = inspect_file(path, strict=True)  # inspect never raises on conflicts
    assert (result.triples, result.entities, result.properties, result.rows_read) == (4, 2, 2, 5)
    assert result.top_properties == [("symbol", 3), ("mass", 1)]
    assert result.duplicates == 1 and len(result.conflicts) == 1
    text = format_inspect(result)
    assert str(path) in text
    assert "triples:          4 (from 5 rows)" in text
    assert "symbol (3), mass (1)" in text
    assert "Iron | symbol: 'Fe' (facts.csv:2), 'Fx' (facts.csv:4)" in text
    assert "ignored extra column(s): 'notes'" in text
    assert "The symbol of Iron -> Fe" in text


def test_inspect_file_lets_load_errors_raise(tmp_path):
    path = write_file(tmp_path, "bad.csv", "name,property,value\nIron,,Fe\n")
    assert "line 2: empty 'property' field" in str(format_error(inspect_file, path))
