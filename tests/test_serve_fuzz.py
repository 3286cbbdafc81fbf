"""Property-based fuzzing of the server's endpoints (Hypothesis): malformed and hostile requests never
produce a 500, every refusal is JSON that says what is wrong, and a refused request never changes the KB.

Examples per test: KBLAM_SERVE_FUZZ_EXAMPLES (default 25, a few seconds each); `make fuzz-serve` runs thousands.
"""

from __future__ import annotations

import json
import os
import string

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from serve_fixtures import ELEMENTS, make_app, make_store, tiny_model

from kblam.serve.security import Limits
from kblam.store import KBStore

EXAMPLES = int(os.environ.get("KBLAM_SERVE_FUZZ_EXAMPLES", "25"))
# Hostile examples are long strings by design; Hypothesis warns about their repr.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON_ENDPOINTS = [("POST", "/v1/ask"), ("POST", "/v1/chat/completions"), ("POST", "/v1/kb/triples"),
                  ("PATCH", "/v1/kb/triples"), ("POST", "/v1/kb/import"), ("DELETE", "/v1/kb/triples"),
                  ("PUT", "/v1/kb/triples"), ("POST", "/v1/kb"), ("POST", "/healthz"), ("POST", "/v1/models")]
QUERY_ENDPOINTS = [("GET", "/v1/kb/triples"), ("DELETE", "/v1/kb/triples"), ("GET", "/v1/kb/export"),
                   ("GET", "/v1/kb"), ("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/nope/../v1/kb")]
HOSTILE = ["", " ", "\x00", "\ud800", "\udfff x", "../../etc/passwd", "/etc/passwd", "C:\\Windows\\win.ini",
           "%2e%2e%2f", "<script>alert(1)</script>", "NaN", "-1", "1e309", "\u202e\u2066", "\r\n", "*",
           "Gold", "symbol", "Au", '"', "{}", "[]", "null", "\ufeff", "名前"]

text = st.text(max_size=40) | st.sampled_from(HOSTILE) | st.integers(1_990, 12_000).map(lambda n: "A" * n)
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | text
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4),
                           max_leaves=12)
header_text = st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=30)

# Bodies shaped like the real ones, each field hostile: they reach the validation past the JSON shape.
shaped = st.one_of(
    st.fixed_dictionaries({"question": json_values | text | st.lists(text, max_size=40)},
                          optional={"max_new_tokens": json_values, "max_sources": json_values,
                                    "min_confidence": json_values, "extra": json_values}),
    st.fixed_dictionaries({"name": json_values | text, "property": json_values | text, "value": json_values | text},
                          optional={"triples": json_values}),
    st.fixed_dictionaries({"triples": st.lists(st.fixed_dictionaries(
        {"name": text, "property": text, "value": json_values | text}), max_size=3)}),
    st.fixed_dictionaries({"messages": json_values | st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]) | text,
         "content": json_values | text}), max_size=3)},
        optional={"max_tokens": json_values, "temperature": json_values, "top_p": json_values, "n": json_values,
                  "stream": json_values, "model": json_values}),
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = tiny_model()
    store = make_store(tmp_path_factory.mktemp("fuzz") / "kb.kbstore", model.encoder, ELEMENTS)
    limits = Limits(max_body_bytes=64 << 10, max_upload_bytes=64 << 10, max_new_tokens=8)
    with TestClient(make_app(model, store, limits=limits), raise_server_exceptions=False) as client:
        yield client, store


def snapshot(store):
    with KBStore.open(store, readonly=True) as s:
        return s.generation, s.triples()


def check(response, before, store) -> None:
    """The property: no 5xx; a refusal is an OpenAI-shaped JSON error in words; a refusal changes nothing."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    event(f"status {response.status_code}")
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"].strip()
        assert snapshot(store) == before, "a refused request changed the KB"


@FUZZ
@given(endpoint=st.sampled_from(JSON_ENDPOINTS), body=shaped | json_values,
       if_match=st.none() | header_text, content_type=st.sampled_from(
           ["application/json", "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"]))
def test_json_bodies(served, endpoint, body, if_match, content_type):
    client, store = served
    before = snapshot(store)
    try:
        payload = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return
    headers = {"Content-Type": content_type, **({"If-Match": if_match} if if_match is not None else {})}
    check(client.request(*endpoint, content=payload, headers=headers), before, store)


@FUZZ
@given(endpoint=st.sampled_from(JSON_ENDPOINTS), body=st.binary(max_size=300),
       content_type=st.none() | st.sampled_from(["application/json", "multipart/form-data; boundary=x",
                                                 "multipart/form-data", "text/csv"]) | header_text)
def test_raw_bytes(served, endpoint, body, content_type):
    client, store = served
    before = snapshot(store)
    headers = {} if content_type is None else {"Content-Type": content_type}
    check(client.request(*endpoint, content=body, headers=headers), before, store)


@FUZZ
@given(endpoint=st.sampled_from(QUERY_ENDPOINTS), params=st.dictionaries(
    st.sampled_from(["name", "property", "q", "offset", "limit", "format", "path", "file"]) | text,
    text | st.integers(-10**20, 10**20).map(str), max_size=4) | st.fixed_dictionaries(
    {"name": text, "property": text}, optional={"q": text, "limit": text, "offset": text}),
    if_match=st.none() | header_text)
def test_query_strings(served, endpoint, params, if_match):
    client, store = served
    before = snapshot(store)
    params = {k.encode("utf-8", "replace").decode(): v.encode("utf-8", "replace").decode() for k, v in params.items()}
    headers = {} if if_match is None else {"If-Match": if_match}
    response = client.request(*endpoint, params=params, headers=headers)
    if endpoint[0] == "DELETE" and response.status_code == 200:
        return  # a well-formed delete of a stored entity: allowed to change the KB
    check(response, before, store)


@FUZZ
@given(filename=text | st.sampled_from(["kb.csv", "kb.json", "kb.jsonl", "kb.parquet", "kb.tsv", "../kb.csv",
                                        "/etc/passwd", "kb.csv\x00.txt", "..", "kb.CSV"]),
       content=st.binary(max_size=400) | st.lists(st.tuples(text, text, text), max_size=4).map(
           lambda rows: ("name,property,value\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)).encode(
               "utf-8", "surrogatepass")),
       field=st.sampled_from(["file", "upload", "files"]), if_match=st.none() | header_text)
def test_uploads(served, filename, content, field, if_match):
    client, store = served
    before = snapshot(store)
    headers = {} if if_match is None else {"If-Match": if_match}
    try:
        response = client.post("/v1/kb/import", files={field: (filename, content)}, headers=headers)
    except UnicodeEncodeError:
        return  # httpx cannot write this file name into a header: no request was sent
    if response.status_code == 200:
        event("upload accepted")
        return  # a valid KB file: it may add to the KB (nothing here is a path: see test_serve.py)
    check(response, before, store)
    assert "kblam-uploads" not in response.text and "/tmp/" not in response.text
