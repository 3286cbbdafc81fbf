"""The `kblam` command as a shell user meets it: output, messages and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kblam.cli import main

EXAMPLE = Path(__file__).parents[1] / "examples" / "elements.csv"


def test_inspect_prints_counts(capsys):
    assert main(["kb", "inspect", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "triples" in out.lower()


def test_inspect_missing_file_exits_1(capsys, tmp_path):
    assert main(["kb", "inspect", str(tmp_path / "nope.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kblam: error:") and "nope.csv" in err


def test_inspect_bad_csv_names_the_line(capsys, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,property,value\ngold,symbol,Au\niron,symbol,\n", encoding="utf-8")
    assert main(["kb", "inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.csv" in err and "3" in err


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "What?"])  # --kb missing
    assert exit_info.value.code == 2


def test_ask_rejects_bad_kb_before_loading_a_model(capsys, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    assert main(["ask", "--kb", str(empty), "What?"]) == 1
    assert "empty.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_ask_on_the_default_model(capsys):
    assert main(["ask", "--kb", str(EXAMPLE), "--max-new-tokens", "16", "--sources", "2", "--json", "Who discovered chlorine?"]) == 0
    captured = capsys.readouterr()
    assert "untrained" not in captured.err  # the shipped adapter is trained
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["question"] == "Who discovered chlorine?"
    assert len(record["sources"]) == 2 and {"name", "property", "value", "score"} <= set(record["sources"][0])
    assert record["sources"][0]["property"] == "discoverer" and record["sources"][0]["name"] == "Chlorine"


def test_train_and_eval_commands_check_their_arguments(capsys, tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("stepz: 1\n", encoding="utf-8")
    assert main(["train", str(bad)]) == 1
    assert "unknown recipe keys" in capsys.readouterr().err
    assert main(["eval", "--sizes", "0"]) == 1
    assert "--sizes" in capsys.readouterr().err
