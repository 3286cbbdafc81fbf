"""Issue 13, items 6-8 and 10: hostile-but-plausible KB files get a KBFormatError naming the file."""

from __future__ import annotations

import os

import pytest
from conftest import format_error, write_file

from kblam.kb import MAX_FIELD_CHARS, KnowledgeBase, Triple

# --- item 6: repeated columns ----------------------------------------------------------------------

def test_csv_with_two_value_columns_is_an_error(tmp_path):
    path = write_file(tmp_path, "two.csv", "name,property,value,value\nGold,symbol,Au,Ag\n")
    error = format_error(KnowledgeBase.from_csv, path)
    assert error.path == str(path) and error.line == 1
    assert "'value' appears 2 times in the header (columns 3, 4)" in error.reason


def test_csv_repeated_extra_column_is_an_error_too(tmp_path):
    # Which 'note' did the user mean? Neither is used, but the file is not what its author thinks.
    path = write_file(tmp_path, "notes.csv", "name,property,value,note,note\nGold,symbol,Au,a,b\n")
    assert "'note' appears 2 times" in str(format_error(KnowledgeBase.from_csv, path))


def test_columns_differing_only_in_case_are_ambiguous(tmp_path):
    path = write_file(tmp_path, "case.csv", "name,property,Value,value\nGold,symbol,Au,Ag\n")
    assert "differ only in case" in str(format_error(KnowledgeBase.from_csv, path))
    kb = KnowledgeBase.from_csv(path, columns={"value": "value"})  # the exact name settles it
    assert [t.value for t in kb] == ["Ag"]


def test_json_records_with_keys_differing_only_in_case(tmp_path):
    path = write_file(tmp_path, "case.jsonl", '{"name": "Gold", "property": "symbol", "value": "Au", "VALUE": "Ag"}\n')
    error = format_error(KnowledgeBase.from_jsonl, path)
    assert error.line == 1 and "differ only in case" in error.reason


def test_dataset_csv_with_repeated_column_is_an_error(tmp_path):
    path = write_file(tmp_path, "two.csv", "name,property,value,value\nGold,symbol,Au,Ag\n")
    error = format_error(KnowledgeBase.from_dataset, path)
    assert error.path == str(path) and "'value' appears 2 times" in error.reason


# --- item 7: JSON edge cases ---------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deeply_nested_json_names_the_file(tmp_path, suffix):
    path = write_file(tmp_path, "deep" + suffix, "[" * 100_000 + "]" * 100_000)
    error = format_error(KnowledgeBase.from_file, path)
    assert error.path == str(path) and "nested too deeply" in error.reason


def test_nesting_just_under_the_parser_limit_is_a_short_message(tmp_path):
    # Parsed fine, then refused as a value: the message must not recurse through the whole value.
    path = write_file(tmp_path, "deep.jsonl", '{"name": "a", "property": "b", "value": ' + "[" * 900 + "]" * 900 + "}\n")
    error = format_error(KnowledgeBase.from_jsonl, path)
    assert error.line == 1 and len(str(error)) < 300


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_5000_digit_integer_names_the_file_and_line(tmp_path, suffix):
    text = '[{"name": "a", "property": "b", "value": 1}]' if suffix == ".json" else '{"name": "a", "property": "b", "value": 1}'
    path = write_file(tmp_path, "big" + suffix, "\n" + text.replace("1", "9" * 5000))
    error = format_error(KnowledgeBase.from_file, path)
    assert error.path == str(path) and error.line == 2 and "more than 4300 digits" in error.reason


def test_records_with_a_huge_integer_value():
    error = format_error(KnowledgeBase.from_records, [("a", "b", 10**5000)], max_field_chars=None)
    assert error.path == "<records>" and error.line == 1 and "cannot be converted to text" in error.reason


# --- item 8: one length limit for every loader ----------------------------------------------------

LONG = "x" * (MAX_FIELD_CHARS + 1)


def _files(tmp_path, value: str) -> dict:
    import json

    record = {"name": "Gold", "property": "symbol", "value": value}
    return {
        "csv": write_file(tmp_path, "long.csv", f"name,property,value\nGold,symbol,{value}\n"),
        "json": write_file(tmp_path, "long.json", json.dumps([record])),
        "json map": write_file(tmp_path, "map.json", json.dumps({"Gold": {"symbol": value}})),
        "jsonl": write_file(tmp_path, "long.jsonl", json.dumps(record) + "\n"),
    }


@pytest.mark.parametrize("kind", ["csv", "json", "json map", "jsonl", "records", "triples", "dataset"])
def test_every_loader_refuses_the_same_overlong_value(tmp_path, kind):
    if kind == "records":
        load, arg = KnowledgeBase.from_records, [{"name": "Gold", "property": "symbol", "value": LONG}]
    elif kind == "triples":
        load, arg = KnowledgeBase.from_records, [Triple("Gold", "symbol", LONG)]
    elif kind == "dataset":
        import datasets

        load, arg = KnowledgeBase.from_dataset, datasets.Dataset.from_list([{"name": "Gold", "property": "symbol", "value": LONG}])
    else:
        load, arg = KnowledgeBase.from_file, _files(tmp_path, LONG)[kind]
    error = format_error(load, arg)
    assert f"'value' is {len(LONG):,} characters long, over the limit of {MAX_FIELD_CHARS:,}" in error.reason
    assert error.line is not None and error.path
    # ... and all of them take the same argument to allow it.
    assert load(arg, max_field_chars=None)[0].value == LONG
    assert load(arg, max_field_chars=len(LONG))[0].value == LONG


def test_csv_fields_beyond_the_csv_modules_own_limit_obey_max_field_chars(tmp_path):
    big = "y" * 200_000  # over csv's default field_size_limit of 131,072
    path = write_file(tmp_path, "big.csv", f"name,property,value\nGold,symbol,{big}\n")
    assert "over the limit of 10,000" in str(format_error(KnowledgeBase.from_csv, path))
    assert KnowledgeBase.from_csv(path, max_field_chars=None)[0].value == big


def test_names_and_properties_are_limited_too():
    error = format_error(KnowledgeBase.from_records, [(LONG, "symbol", "Au")])
    assert error.reason.startswith("'name' is 10,001 characters long")
    error = format_error(KnowledgeBase.from_records, [("Gold", LONG, "Au")])
    assert error.reason.startswith("'property' is 10,001 characters long")


# --- item 10: encodings, links, empty parquet -----------------------------------------------------

@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_utf16_and_utf32_files_with_a_bom_are_read(tmp_path, encoding, suffix):
    import codecs

    text = {".csv": "name,property,value\nGöld,symbol,Au\n",
            ".json": '[{"name": "Göld", "property": "symbol", "value": "Au"}]',
            ".jsonl": '{"name": "Göld", "property": "symbol", "value": "Au"}\n'}[suffix]
    bom = codecs.BOM_UTF16_BE if encoding == "utf-16-be" else b""
    path = write_file(tmp_path, "wide" + suffix, bom + text.encode(encoding))
    assert list(KnowledgeBase.from_file(path)) == [Triple("Göld", "symbol", "Au")]


def test_utf16_without_a_bom_gets_the_right_hint(tmp_path):
    path = write_file(tmp_path, "wide.csv", "name,property,value\nGold,symbol,Au\n".encode("utf-16-le"))
    error = format_error(KnowledgeBase.from_csv, path)
    assert "UTF-16-LE" in error.reason and "encoding='utf-16-le'" in error.reason and "latin-1" not in error.reason
    assert len(KnowledgeBase.from_csv(path, encoding="utf-16-le")) == 1


def test_a_symlink_loop_is_not_reported_as_missing(tmp_path):
    loop = tmp_path / "loop.csv"
    os.symlink(loop, loop)
    with pytest.raises(OSError) as info:
        KnowledgeBase.from_file(loop)
    assert not isinstance(info.value, FileNotFoundError)
    assert "symbolic link loop" in str(info.value) and "loop.csv" in str(info.value)


def test_a_dangling_symlink_says_so(tmp_path):
    link = tmp_path / "link.csv"
    os.symlink(tmp_path / "gone.csv", link)
    with pytest.raises(FileNotFoundError, match="symbolic link to a missing file"):
        KnowledgeBase.from_file(link)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    assert "not a regular file" in str(format_error(KnowledgeBase.from_file, fifo))


def test_parquet_with_no_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"name": pa.array([], pa.string()), "property": pa.array([], pa.string()),
                             "value": pa.array([], pa.string())}), path)
    error = format_error(KnowledgeBase.from_file, path)
    assert error.path == str(path) and error.reason.startswith("the parquet file has no rows")
    assert format_error(KnowledgeBase.from_file, write_file(tmp_path, "zero.parquet", b"")).reason == "file is empty"


def test_datasets_errors_show_the_parsers_reason_on_one_line(tmp_path):
    # datasets wraps it as "DatasetGenerationError: An error occurred while generating the dataset".
    error = format_error(KnowledgeBase.from_dataset, write_file(tmp_path, "quote.csv", 'name,property,value\n"Gold,symbol\n'))
    assert "EOF inside string" in error.reason and "\n" not in str(error)
