"""Property-based tests (issue 13): hostile input into every loader and into the adapter loader.

Whatever the input, a loader either returns a valid KnowledgeBase or raises the library's own error
(KBFormatError, AdapterLoadError) naming the file, in one line. Nothing else may escape: no
UnicodeDecodeError, RecursionError, csv.Error, SafetensorError, KeyError, ...

Examples per test: KBLAM_FUZZ_EXAMPLES (default 25, a few seconds each). `make fuzz` runs thousands.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_adapter
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from kb_builders.records import ALIASES
from kblam import AdapterLoadError
from kblam.adapter import CONFIG_NAME, WEIGHTS_NAME, KBAdapter, KBLaMConfig, load_calibration, load_weights
from kblam.kb import FIELDS, MAX_FIELD_CHARS, KBFormatError, KnowledgeBase, Triple

EXAMPLES = int(os.environ.get("KBLAM_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])

SUFFIXES = [".csv", ".tsv", ".json", ".jsonl", ".parquet"]


def check_kb_or_error(load, path, label: str | None = None, empty_ok: bool = False, **kw):
    """The property: a KnowledgeBase of clean triples, or a one-line library error naming `label`."""
    label = label or str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate/conflict warnings are part of a normal load
        try:
            kb = load(path, **kw)
        except KBFormatError as error:
            assert error.path == label, (error.path, label)
            assert str(error).startswith(label) and "\n" not in str(error), str(error)
            event("KBFormatError")
            return None
    event("loaded")
    assert isinstance(kb, KnowledgeBase) and (len(kb) > 0 or empty_ok)  # an empty file is an error
    for triple in kb:
        for f in FIELDS:
            text = getattr(triple, f)
            assert isinstance(text, str) and text == text.strip() and 0 < len(text) <= MAX_FIELD_CHARS
    return kb


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def write(workdir, name: str, data: bytes):
    path = workdir / name
    path.write_bytes(data)
    return path


# --- arbitrary bytes ----------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=3000), suffix=st.sampled_from(SUFFIXES))
def test_arbitrary_bytes_into_every_file_loader(workdir, data, suffix):
    path = write(workdir, "any" + suffix, data)
    check_kb_or_error(KnowledgeBase.from_file, path)


@FUZZ
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".csv", ".jsonl", ".json"]))
def test_arbitrary_bytes_into_the_datasets_loader(workdir, data, suffix):
    path = write(workdir, "ds" + suffix, data)
    check_kb_or_error(KnowledgeBase.from_dataset, path)


# --- structured but hostile text ----------------------------------------------------------------

NAMES = sorted({a for names in ALIASES.values() for a in names} | {"Name", "VALUE", "Value", "extra", ""})
# Long strings enter as short markers, so Hypothesis's reports stay readable.
LONG = {"<digits>": "9" * 4400, "<long>": "x" * (MAX_FIELD_CHARS + 1)}
NASTY = ['"', '""', ",", ";", "\t", "|", "\n", "\r\n", "\r", "\x00", "\ufeff", "\x1b[31m", "\u202e", " ",
         "NaN", "null", "1e999", "{name.__class__}", *LONG]
nasty = st.sampled_from(NASTY + NAMES).map(lambda s: LONG.get(s, s))
cell = st.one_of(st.text(max_size=12), nasty)
field_texts = st.one_of(st.text(min_size=1, max_size=10), nasty)
encodings = st.one_of(st.just("utf-8"), st.sampled_from(["utf-8-sig", "utf-16", "utf-16-le", "utf-32", "cp1252"]))


@st.composite
def csv_files(draw) -> bytes:
    header = draw(st.one_of(st.permutations(FIELDS).map(list), st.lists(st.one_of(st.sampled_from(NAMES), cell), max_size=6)))
    width = len(header)
    rows = draw(st.lists(st.one_of(st.lists(field_texts, min_size=width, max_size=width),
                                   st.lists(cell, min_size=width, max_size=width), st.lists(cell, max_size=7)), max_size=6))
    delimiter = draw(st.sampled_from(",;\t|"))
    if draw(st.booleans()):  # well-quoted, as a spreadsheet writes it
        buf = io.StringIO()
        csv.writer(buf, delimiter=delimiter).writerows([header, *rows])
        text = buf.getvalue()
    else:  # raw: unbalanced quotes, stray delimiters, ragged rows
        text = "\n".join(delimiter.join(r) for r in [header, *rows])
    return text.encode(draw(encodings), errors="replace")


# A number too long for Python's int/str conversion. It never enters Hypothesis itself (whose own
# reports would fail to print it): JSON gets a placeholder that dump() swaps for the digits, and
# records get an int whose repr() is short while str() still refuses.
HUGE_DIGITS = "9" * 4400


class HugeInt(int):
    __str__ = int.__repr__

    def __repr__(self) -> str:
        return "HugeInt(10**4400 - 1)"


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.just("<huge>"),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=16), nasty,
)
json_values = st.recursive(  # empty containers come from the base case: Hypothesis wants extend() to need `inner`
    st.one_of(json_scalars, st.builds(list), st.builds(dict)),
    lambda inner: st.one_of(st.lists(inner, min_size=1, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=6)), inner,
                                            min_size=1, max_size=5)),
    max_leaves=16,
)
records = st.one_of(
    st.fixed_dictionaries({f: field_texts for f in FIELDS}),  # nearly right: the deeper paths run
    st.fixed_dictionaries({"name": field_texts, "property": field_texts,
                           "value": st.one_of(field_texts, st.integers(), st.floats(), st.lists(field_texts, max_size=3))}),
    st.dictionaries(st.sampled_from(NAMES), json_values, max_size=6),
)


def dump(value) -> str:
    return json.dumps(value).replace('"<huge>"', HUGE_DIGITS)


@st.composite
def json_texts(draw) -> str:
    doc = draw(st.one_of(
        st.lists(st.one_of(records, json_values), max_size=5),  # a list of records
        st.dictionaries(st.text(max_size=8), st.one_of(st.dictionaries(st.sampled_from(NAMES), json_values, max_size=3),
                                                       json_values), max_size=4),  # {name: {property: value}}
        json_values,
    ))
    text = dump(doc)
    mutation = draw(st.sampled_from(["none", "truncate", "deep", "repeat key", "garbage"]))
    if mutation == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif mutation == "deep":
        depth = draw(st.sampled_from([10, 500, 990, 5000, 100_000]))
        text = "[" * depth + text + "]" * depth
    elif mutation == "repeat key" and text.startswith("{") and len(text) > 2:
        text = '{"name": "a", "name": "b", ' + text[1:]
    elif mutation == "garbage":
        text += draw(st.text(max_size=8))
    return text


@FUZZ
@given(data=csv_files(), suffix=st.sampled_from([".csv", ".tsv", ".txt"]))
def test_hostile_csv(workdir, data, suffix):
    check_kb_or_error(KnowledgeBase.from_file, write(workdir, "hostile" + suffix, data))


@FUZZ
@given(data=csv_files())
def test_hostile_csv_through_datasets(workdir, data):
    check_kb_or_error(KnowledgeBase.from_dataset, write(workdir, "hostile_ds.csv", data))


@FUZZ
@given(text=json_texts(), encoding=encodings)
def test_hostile_json(workdir, text, encoding):
    check_kb_or_error(KnowledgeBase.from_json, write(workdir, "hostile.json", text.encode(encoding, errors="replace")))


@FUZZ
@given(lines=st.lists(st.one_of(records.map(dump), json_texts(), st.text(max_size=10)), max_size=6),
       encoding=encodings)
def test_hostile_jsonl(workdir, lines, encoding):
    data = "\n".join(line.replace("\n", " ") for line in lines).encode(encoding, errors="replace")
    check_kb_or_error(KnowledgeBase.from_jsonl, write(workdir, "hostile.jsonl", data))


python_values = st.one_of(json_values, st.just(HugeInt(10**4400 - 1)), st.binary(max_size=4), st.fractions(), st.decimals(), st.complex_numbers(),
                          st.builds(object), st.sets(st.integers(), max_size=2), st.tuples(json_scalars))


@FUZZ
@given(items=st.lists(st.one_of(
    records,
    st.dictionaries(st.one_of(st.sampled_from(NAMES), st.integers()), python_values, max_size=5),
    st.tuples(python_values, python_values, python_values),
    st.lists(python_values, max_size=4),
    python_values,
    st.builds(Triple, st.text(min_size=1, max_size=5).filter(str.strip), st.just("p"), st.sampled_from(["v", "x" * 10_001])),
), max_size=6))
def test_hostile_records(items):
    check_kb_or_error(KnowledgeBase.from_records, items, label="<records>", empty_ok=True)  # like KnowledgeBase([])


# --- adapter folders ------------------------------------------------------------------------------

CONFIG_FIELDS = list(KBLaMConfig.__dataclass_fields__)


@pytest.fixture(scope="module")
def good_adapter(workdir):
    return save_tiny_adapter(workdir / "good-adapter")


def check_adapter_or_error(folder):
    """The property: a config and weights that really build and run an adapter, or one AdapterLoadError."""
    try:
        config = KBLaMConfig.load(folder)
        state = load_weights(folder, config)
    except AdapterLoadError as error:
        assert error.path in (str(folder / CONFIG_NAME), str(folder / WEIGHTS_NAME)), str(error)
        assert "\n" not in str(error)
        event(f"AdapterLoadError in {Path(error.path).name}")
        return None
    event("loaded")
    adapter = KBAdapter(config)
    adapter.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    if config.kb_scale_factor is not None:
        math.log(config.kb_scale_factor)
    triple = Triple("gold", "symbol", "Au")
    for template in (config.key_template, config.value_template):
        # Only plain fields, each longer in the template than its value here: no attribute access, no padding.
        text = template.format(**triple.to_record())
        assert len(text) <= len(template) and "<class" not in text
    states = adapter.kb_states(torch.randn(3, config.encoder_dim), torch.randn(3, config.encoder_dim))
    assert all(torch.isfinite(k).all() and torch.isfinite(v).all() for k, v in states.values())
    return config


templates = st.one_of(st.text(alphabet="{}!:.[]_0 namepropertyvalue", max_size=20),
                      st.sampled_from(["{name}", "{name.__class__}", "{value[0]}", "{value:>9999}", "{}", "{{name}}",
                                       "The {property} of {name}", "{value!r}", "{name", "name}"]))
field_values = st.one_of(json_values, templates, st.integers(-3, 40), st.lists(st.integers(-2, 5), max_size=4))


@FUZZ
@given(changes=st.dictionaries(st.one_of(st.sampled_from(CONFIG_FIELDS), st.text(max_size=6)),
                               st.one_of(st.just("<delete>"), field_values), max_size=4))
def test_arbitrary_adapter_configs(workdir, good_adapter, changes):
    folder = workdir / "config-fuzz"
    folder.mkdir(exist_ok=True)
    (folder / WEIGHTS_NAME).write_bytes((good_adapter / WEIGHTS_NAME).read_bytes())
    data = dict(json.loads((good_adapter / CONFIG_NAME).read_text()))
    for key, value in changes.items():
        if value == "<delete>":
            data.pop(key, None)
        else:
            data[key] = value
    (folder / CONFIG_NAME).write_text(dump(data))
    check_adapter_or_error(folder)


@FUZZ
@given(text=st.one_of(json_texts(), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_config_files(workdir, good_adapter, text):
    folder = workdir / "config-text-fuzz"
    folder.mkdir(exist_ok=True)
    (folder / WEIGHTS_NAME).write_bytes((good_adapter / WEIGHTS_NAME).read_bytes())
    (folder / CONFIG_NAME).write_text(text, encoding="utf-8", errors="surrogateescape")
    assert check_adapter_or_error(folder) is None or text.lstrip().startswith("{")


dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.bool, torch.float64])


@FUZZ
@given(data=st.data())
def test_arbitrary_adapter_weights(workdir, good_adapter, data):
    folder = workdir / "weights-fuzz"
    folder.mkdir(exist_ok=True)
    (folder / CONFIG_NAME).write_bytes((good_adapter / CONFIG_NAME).read_bytes())
    raw = (good_adapter / WEIGHTS_NAME).read_bytes()
    kind = data.draw(st.sampled_from(["bytes", "cut", "flip", "tensors"]))
    if kind == "bytes":
        blob = data.draw(st.binary(max_size=500))
    elif kind == "cut":
        blob = raw[: data.draw(st.integers(0, len(raw)))]
    elif kind == "flip":  # damage the header or the data
        at = data.draw(st.integers(0, min(len(raw) - 1, 400)))
        blob = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1:]
    else:
        state = load_file(str(good_adapter / WEIGHTS_NAME))
        names = sorted(state)
        for name in data.draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
            action = data.draw(st.sampled_from(["shape", "dtype", "nan", "drop", "rename"]))
            t = state.pop(name)
            if action == "shape":
                shape = data.draw(st.lists(st.integers(0, 9), max_size=3))
                state[name] = torch.zeros(shape)
            elif action == "dtype":
                state[name] = t.to(data.draw(dtypes))
            elif action == "nan":
                flat = t.clone().reshape(-1)
                flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(st.sampled_from([math.nan, -math.inf]))
                state[name] = flat.reshape(t.shape)
            elif action == "rename":
                state[name + data.draw(st.sampled_from([".x", "_", "0"]))] = t
        assume(state)
        buffer = folder / "tmp.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(buffer))
        blob = buffer.read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(blob)
    check_adapter_or_error(folder)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["features", "mean", "scale", "weights", "bias", "threshold", "report",
                                                "extra"]),
                               st.one_of(st.just("<delete>"), field_values,
                                         st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=10)),
                               max_size=3))
def test_arbitrary_calibrations(workdir, changes):
    from kblam.confidence import CALIBRATION_NAME, SIGNALS

    folder = workdir / "calibration-fuzz"
    folder.mkdir(exist_ok=True)
    n = len(SIGNALS)
    data = {"features": list(SIGNALS), "mean": [0.0] * n, "scale": [1.0] * n, "weights": [0.5] * n, "bias": 0.0}
    for key, value in changes.items():
        data.pop(key, None) if value == "<delete>" else data.__setitem__(key, value)
    (folder / CALIBRATION_NAME).write_text(dump(data))
    try:
        calibrator = load_calibration(folder)
    except AdapterLoadError as error:
        assert error.path == str(folder / CALIBRATION_NAME) and "\n" not in str(error), str(error)
        event("AdapterLoadError")
        return
    event("loaded")
    (p,) = calibrator.confidence([dict.fromkeys(calibrator.features, 0.0)])
    assert 0.0 <= p <= 1.0 and 0.0 <= calibrator.threshold <= 1.0
