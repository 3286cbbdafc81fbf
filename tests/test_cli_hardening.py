"""Issue 13: the CLI over bad files and adapter folders (exit 1, one line, no traceback), and KB text
escaped on display (item 9)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_adapter
from safetensors.torch import load_file, save_file

from kblam.adapter import CONFIG_NAME, WEIGHTS_NAME
from kblam.cli import main

EXAMPLE = Path(__file__).parents[1] / "examples" / "elements.csv"


def bad_files(tmp: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {
        "two value columns": ("two.csv", b"name,property,value,value\nGold,symbol,Au,Ag\n"),
        "deep json": ("deep.json", b"[" * 100_000),
        "huge integer": ("big.json", b'[{"name": "a", "property": "b", "value": ' + b"9" * 5000 + b"}]"),
        "utf-16 without BOM": ("wide.csv", "name,property,value\nGold,symbol,Au\n".encode("utf-16-le")),
        "binary": ("binary.csv", bytes(range(256)) * 4),
        "broken parquet": ("broken.parquet", b"PAR1 not really"),
        "overlong value": ("long.jsonl", json.dumps({"name": "a", "property": "b", "value": "x" * 10_001}).encode()),
        "escape in header": ("esc.csv", b"\x1b[2Jname,\x1b]0;pwned\x07\n"),
    }
    out = {}
    for key, (name, data) in files.items():
        out[key] = tmp / name
        out[key].write_bytes(data)
    out["empty parquet"] = tmp / "empty.parquet"
    pq.write_table(pa.table({"name": pa.array([], pa.string())}), out["empty parquet"])
    out["symlink loop"] = tmp / "loop.csv"
    os.symlink(out["symlink loop"], out["symlink loop"])
    out["missing"] = tmp / "missing.csv"
    out["directory"] = tmp / "folder.csv"
    out["directory"].mkdir()
    return out


def bad_adapters(tmp: Path) -> dict[str, Path]:
    def make(name, config_changes=(), weights_change=None, raw_config=None):
        folder = save_tiny_adapter(tmp / name)
        if weights_change:
            state = load_file(str(folder / WEIGHTS_NAME))
            weights_change(state)
            save_file(state, str(folder / WEIGHTS_NAME))
        data = json.loads((folder / CONFIG_NAME).read_text())
        for key, value in dict(config_changes).items():
            data.pop(key) if value is ... else data.__setitem__(key, value)
        (folder / CONFIG_NAME).write_text(raw_config if raw_config is not None else json.dumps(data))
        return folder

    calibrated = make("calibration")
    (calibrated / "calibration.json").write_text('{"features": "top_share", "mean": [], "scale": [], "weights": [], "bias": 0}')
    truncated = make("truncated")
    data = (truncated / WEIGHTS_NAME).read_bytes()
    (truncated / WEIGHTS_NAME).write_bytes(data[: len(data) // 3])
    return {  # folder -> what the message must say
        make("no-layers", {"kb_layers": ...}): "field 'kb_layers': is missing",
        make("not-json", raw_config="kb_layers = [0, 2]"): "is not valid JSON",
        make("zero-scale", {"kb_scale_factor": 0}): "field 'kb_scale_factor': must be > 0",
        make("template", {"key_template": "{name.__class__}"}): "field 'key_template'",
        make("trained", {"trained": "no"}): "field 'trained': must be true or false",
        make("nan", weights_change=lambda s: s["value_proj.0.weight"].fill_(float("nan"))): "NaN or infinite",
        make("shape", weights_change=lambda s: s.update({"key_proj.2.weight": torch.zeros(8, 7)})): "has shape (8, 7)",
        truncated: "not a readable safetensors file",
        calibrated: "calibration.json, field 'features': must be a list of strings",
        tmp / "nowhere": "adapter folder not found",
    }


def one_line_error(capsys, code: int, *names: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert code == 1, err
    assert captured.out == ""
    assert err.startswith("kblam: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "\x1b" not in err and "\x07" not in err
    assert any(n in err for n in names), err
    return err


def test_cli_over_bad_kb_files(tmp_path, capsys):
    for what, path in bad_files(tmp_path).items():
        for argv in (["kb", "inspect", str(path)], ["ask", "--kb", str(path), "What?"]):
            err = one_line_error(capsys, main(argv), path.name)
            assert what != "symlink loop" or "symbolic link loop" in err


def test_cli_over_bad_adapter_folders(tmp_path, capsys):
    for folder, says in bad_adapters(tmp_path).items():
        code = main(["ask", "--kb", str(EXAMPLE), "--adapter", str(folder), "What is the symbol of gold?"])
        err = one_line_error(capsys, code, str(folder / CONFIG_NAME), str(folder / WEIGHTS_NAME), str(folder))
        assert says in err, err


HOSTILE = "Au\x1b[31m RED\x1b[0m\x00\nforged line\u202edesrever\x9b2J"


def test_inspect_escapes_kb_text(tmp_path, capsys):
    path = tmp_path / "hostile.jsonl"
    path.write_text(json.dumps({"name": "Gold\x07", "property": "symbol", "value": HOSTILE}) + "\n", encoding="utf-8")
    assert main(["kb", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for raw in ("\x1b", "\x00", "\x07", "\u202e", "\x9b"):
        assert raw not in out
    assert r"Au\x1b[31m RED\x1b[0m\x00\nforged line\u202edesrever\x9b2J" in out
    assert not any(line.startswith("forged line") for line in out.splitlines())


class _FakeModel:
    """Stands in for a loaded KBLaM: answers with the first triple, so the CLI prints KB text."""

    def ask(self, questions, kb, **_):
        from kblam.model import Answer

        triple = kb[0]
        return [Answer(question=q, text=f"The symbol is {triple.value}.", sources=[(triple, 1.0)], quoted=[triple])
                for q in questions]


@pytest.mark.parametrize("as_json", [False, True])
def test_ask_escapes_kb_text_and_the_question(tmp_path, capsys, monkeypatch, as_json):
    from kblam.model import KBLaM

    monkeypatch.setattr(KBLaM, "from_pretrained", classmethod(lambda cls, *a, **k: _FakeModel()))
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps([{"name": "Gold", "property": "symbol", "value": HOSTILE}]), encoding="utf-8")
    question = "What is\x1b[2J the symbol of g\udcffold?"  # \udcff: an undecodable byte in argv
    assert main(["ask", "--kb", str(path), *(["--json"] if as_json else []), question]) == 0
    out = capsys.readouterr().out
    for raw in ("\x1b", "\x00", "\u202e", "\x9b", "\udcff"):
        assert raw not in out
    if as_json:  # exact: the escapes are JSON's, so the strings parse back unchanged
        record = json.loads(out)
        assert record["question"] == question and record["sources"][0]["value"] == HOSTILE
        assert record["answer"] == f"The symbol is {HOSTILE}." and record["quoted"][0]["value"] == HOSTILE
    else:
        assert r"A: The symbol is Au\x1b[31m RED" in out and r"g\udcffold?" in out
        assert len(out.strip().splitlines()) == 4  # Q, A, the quoted triple, one source: no forged lines
