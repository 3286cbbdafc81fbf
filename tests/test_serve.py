"""Issue 11: the HTTP server over a KB store, through FastAPI's test client with a tiny random model.

The answers of a random model are arbitrary: what is checked is the plumbing (the server's answer is
the library's, one KB version per answer, writes durable and versioned) and the refusals (keys, limits,
bad files), not answer quality (tests/test_serve_process.py does that on the default model).
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from serve_fixtures import ELEMENTS, make_app, make_store, tiny_model

from kblam.kb import KnowledgeBase, Triple
from kblam.serve.security import Limits, check_bind, is_loopback, read_api_key
from kblam.store import KBStore

GOLD = "What is the symbol of Gold?"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def store(tmp_path, model):
    return make_store(tmp_path / "kb.kbstore", model.encoder, ELEMENTS)


@pytest.fixture
def client(model, store):
    with TestClient(make_app(model, store)) as c:
        yield c


def triples_of(store) -> list[Triple]:
    with KBStore.open(store, readonly=True) as s:
        return s.triples()


def generation(store) -> int:
    with KBStore.open(store, readonly=True) as s:
        return s.generation


# --- answers -------------------------------------------------------------------------------------


def test_ask_is_the_library_answer(client, model, store):
    """One question and a list: the JSON holds what KBLaM.ask returns on the same store, and the version."""
    questions = [GOLD, "Who discovered Neon?", "What is the atomic number of Iron?"]
    with KBStore.open(store, readonly=True) as s:
        expected = model.ask(questions, kb=s, max_new_tokens=12, max_sources=3)
    got = client.post("/v1/ask", json={"question": questions, "max_new_tokens": 12, "max_sources": 3})
    assert got.status_code == 200, got.text
    answers = got.json()["answers"]
    assert [a["text"] for a in answers] == [e.text for e in expected]
    for a, e in zip(answers, expected, strict=True):
        assert [(s["name"], s["property"], s["value"]) for s in a["sources"]] == \
            [(t.name, t.property, t.value) for t, _ in e.sources]
        assert [s["score"] for s in a["sources"]] == pytest.approx([s for _, s in e.sources], abs=1e-6)
        assert a["quoted"] == [t.to_record() for t in e.quoted] and a["refused"] == e.refused
        assert a["kb_version"] == generation(store) and a["question"] == e.question
    one = client.post("/v1/ask", json={"question": GOLD, "max_new_tokens": 12, "max_sources": 1}).json()["answers"]
    assert len(one) == 1 and one[0]["text"] == answers[0]["text"] and len(one[0]["sources"]) == 1


def test_the_empty_kb_is_said_in_words(model, tmp_path):
    with TestClient(make_app(model, make_store(tmp_path / "empty.kbstore", model.encoder))) as c:
        got = c.post("/v1/ask", json={"question": GOLD})
        assert got.status_code == 409 and "empty" in got.json()["error"]["message"]


def test_concurrent_questions_share_batches(model, store):
    """Twelve clients at once: every one gets its own answer, in fewer generations than questions."""
    questions = [f"What is the symbol of {name}?" for name in
                 ("Gold", "Iron", "Helium", "Sodium", "Oxygen", "Mercury", "Uranium", "Bromine", "Chlorine",
                  "Hydrogen", "Nitrogen", "Polonium")]
    with TestClient(make_app(model, store, batch_window_ms=200)) as c:
        results: dict[str, dict] = {}

        def ask(q):
            results[q] = c.post("/v1/ask", json={"question": q, "max_new_tokens": 6}).json()["answers"][0]

        threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = _metric(c, "kblam_batch_questions_count")
    assert sorted(results) == sorted(questions) and all(results[q]["question"] == q for q in questions)
    assert 1 <= batches < len(questions)


def _metric(client, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_every_answer_reads_one_kb_version(model, tmp_path):
    """A writer replaces every value in one commit per write (tag k at version v_k) while clients ask:
    each answer's sources all carry the one tag of the version the answer reports."""
    names = [f"entity {i}" for i in range(12)]

    def kb(tag: str) -> list[Triple]:
        return [Triple(n, "code", f"{tag} {n}") for n in names]

    store = make_store(tmp_path / "kb.kbstore", model.encoder, kb("t0"))
    tags = {generation(store): "t0"}
    stop, errors, answers = threading.Event(), [], []
    with TestClient(make_app(model, store, batch_window_ms=2)) as c:
        def write():
            for k in range(1, 12):
                if stop.is_set():
                    return
                rows = "".join(f"{t.name},{t.property},{t.value}\n" for t in kb(f"t{k}"))
                got = c.post("/v1/kb/import", files={"file": ("kb.csv", "name,property,value\n" + rows)})
                if got.status_code != 200:
                    errors.append(got.text)
                    return
                tags[got.json()["version"]] = f"t{k}"
                # Let an answer land between writes: on a slow, busy machine the writer could otherwise
                # finish all its commits before the first answer and the test would show no overlap.
                seen = len(answers)
                deadline = time.monotonic() + 10
                while len(answers) == seen and time.monotonic() < deadline and not stop.is_set():
                    time.sleep(0.005)

        def ask(i):
            while not stop.is_set():
                got = c.post("/v1/ask", json={"question": f"What is the code of entity {i}?", "max_new_tokens": 3,
                                              "max_sources": 12})
                if got.status_code != 200:
                    errors.append(got.text)
                    return
                answers.append(got.json()["answers"][0])

        writer = threading.Thread(target=write)
        askers = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in [writer, *askers]:
            t.start()
        writer.join()
        time.sleep(0.2)
        stop.set()
        for t in askers:
            t.join()
    assert not errors
    versions = {a["kb_version"] for a in answers}
    assert len(versions) > 3, versions  # the answers did overlap the writes
    for a in answers:
        seen = {s["value"].split()[0] for s in a["sources"]}
        assert seen == {tags[a["kb_version"]]}, (a["kb_version"], seen)


# --- the KB endpoints ------------------------------------------------------------------------------


def test_kb_info_list_search_and_pages(client, store):
    info = client.get("/v1/kb")
    assert info.status_code == 200 and info.json()["size"] == 50 and info.headers["ETag"] == f'"{generation(store)}"'
    page = client.get("/v1/kb/triples", params={"limit": 20, "offset": 40}).json()
    assert page["total"] == 50 and len(page["triples"]) == 10
    assert page["triples"] == [t.to_record() for t in triples_of(store)[40:]]
    gold = client.get("/v1/kb/triples", params={"q": "GOLD"}).json()
    assert gold["total"] == 4 and {t["name"] for t in gold["triples"]} == {"Gold"}
    exact = client.get("/v1/kb/triples", params={"name": "Gold", "property": "symbol"}).json()
    assert exact["triples"] == [{"name": "Gold", "property": "symbol", "value": "Au"}]
    symbols = client.get("/v1/kb/triples", params={"property": "symbol", "limit": 1000}).json()
    assert symbols["total"] == 12 and all(t["property"] == "symbol" for t in symbols["triples"])
    assert client.get("/v1/kb/triples", params={"q": "no such thing"}).json()["total"] == 0
    blank = client.get("/v1/kb/triples", params={"name": " ", "property": " ", "q": " "})  # no filter, not an error
    assert blank.status_code == 200 and blank.json()["total"] == 50
    padded = client.get("/v1/kb/triples", params={"name": " Gold ", "property": "symbol "}).json()
    assert padded["triples"] == exact["triples"]


def test_writes_are_versioned_and_durable(client, store):
    v0 = generation(store)
    added = client.post("/v1/kb/triples", json={"name": "Neon", "property": "symbol", "value": "Ne"})
    assert added.status_code == 201 and added.json() == {"version": v0 + 1, "added": 1}
    assert added.headers["ETag"] == f'"{v0 + 1}"'
    assert Triple("Neon", "symbol", "Ne") in triples_of(store)  # on disk when the response came
    again = client.post("/v1/kb/triples", json={"triples": [{"name": "Neon", "property": "symbol", "value": "Ne"}]})
    assert again.status_code == 201 and again.json() == {"version": v0 + 1, "added": 0}
    taken = client.post("/v1/kb/triples", json={"name": "Neon", "property": "symbol", "value": "Nx"})
    assert taken.status_code == 409 and "PATCH" in taken.json()["error"]["message"]
    changed = client.patch("/v1/kb/triples", json={"name": "Gold", "property": "symbol", "value": "Zz"})
    assert changed.status_code == 200 and changed.json() == {"version": v0 + 2}
    assert Triple("Gold", "symbol", "Zz") in triples_of(store)
    missing = client.patch("/v1/kb/triples", json={"name": "Gold", "property": "motto", "value": "x"})
    assert missing.status_code == 404 and "motto" in missing.json()["error"]["message"]
    gone = client.delete("/v1/kb/triples", params={"name": "Gold"})
    assert gone.status_code == 200 and gone.json() == {"version": v0 + 3, "removed": 4}
    assert not any(t.name == "Gold" for t in triples_of(store))
    assert client.delete("/v1/kb/triples", params={"name": "Gold"}).status_code == 404
    assert _metric(client, "kblam_kb_writes_total", kind="update") == 1


def test_if_match_refuses_a_stale_write(client, store):
    version = client.get("/v1/kb").json()["version"]
    before = triples_of(store)
    client.patch("/v1/kb/triples", json={"name": "Iron", "property": "symbol", "value": "Fx"})  # someone else
    for tag in (f'"{version}"', str(version), f'W/"{version}"'):
        stale = client.patch("/v1/kb/triples", json={"name": "Gold", "property": "symbol", "value": "Zz"},
                             headers={"If-Match": tag})
        assert stale.status_code == 412 and stale.headers["ETag"] == f'"{version + 1}"'
        assert "changed since" in stale.json()["error"]["message"]
    assert client.delete("/v1/kb/triples", params={"name": "Gold"}, headers={"If-Match": '"0"'}).status_code == 412
    assert triples_of(store) == [Triple("Iron", "symbol", "Fx") if t == Triple("Iron", "symbol", "Fe") else t
                                 for t in before]
    fresh = client.patch("/v1/kb/triples", json={"name": "Gold", "property": "symbol", "value": "Zz"},
                         headers={"If-Match": f'"1", "{version + 1}"'})
    assert fresh.status_code == 200 and client.patch(
        "/v1/kb/triples", json={"name": "Gold", "property": "symbol", "value": "Zy"}, headers={"If-Match": "*"}
    ).status_code == 200


def test_import_and_export(client, store, tmp_path):
    upload = "name,property,value\nNeon,symbol,Ne\nGold,symbol,Gd\n"
    done = client.post("/v1/kb/import", files={"file": ("more.csv", upload)})
    assert done.status_code == 200, done.text
    assert done.json() == {"version": generation(store), "triples_in_file": 2, "changed": 2, "size": 51}
    for fmt in ("jsonl", "json", "csv", "tsv"):
        got = client.get("/v1/kb/export", params={"format": fmt})
        assert got.status_code == 200 and f".{fmt}" in got.headers["Content-Disposition"]
        path = tmp_path / f"export.{fmt}"
        path.write_bytes(got.content)
        assert KnowledgeBase.from_file(path).triples == tuple(triples_of(store))
    assert client.get("/v1/kb/export", params={"format": "xlsx"}).status_code == 422


@pytest.mark.parametrize("name, body, says", [
    ("bad.csv", "name,property,value\nA,b,c\nX,,z\n", "bad.csv, line 3: empty 'property' field"),
    ("bad.json", '[{"name": "A", "property": "b"}]', "bad.json"),
    ("c.csv", "name,property,value\nA,b,c\nA,b,d\n", "conflict"),
    ("notes.txt", "hello", "unsupported file type '.txt'"),
    ("../../etc/passwd.csv", "name,property,value\nA,b,\n", "passwd.csv, line 2"),
    ("empty.jsonl", "", "empty.jsonl"),
])
def test_a_bad_upload_names_the_problem_and_changes_nothing(client, store, name, body, says):
    before, v = triples_of(store), generation(store)
    got = client.post("/v1/kb/import", files={"file": (name, body)})
    assert got.status_code == 422, got.text
    message = got.json()["error"]["message"]
    assert says in message and "/tmp" not in message and "kblam-uploads" not in message
    assert triples_of(store) == before and generation(store) == v


# --- limits and security ---------------------------------------------------------------------------


@pytest.mark.parametrize("body, says", [
    ({"question": "x" * 2001}, "at most 2,000"),
    ({"question": ["q?"] * 33}, "1 to 32 questions"),
    ({"question": []}, "1 to 32 questions"),
    ({"question": "   "}, "empty"),
    ({"question": GOLD, "max_new_tokens": 257}, "at most 256"),
    ({"question": GOLD, "max_new_tokens": 0}, "max_new_tokens"),
    ({"question": GOLD, "max_sources": 51}, "at most 50"),
    ({"question": GOLD, "min_confidence": 1.5}, "min_confidence"),
    ({"question": GOLD, "temperature": 1}, "temperature"),
    ({"question": 7}, "question"),
])
def test_limits_are_clear_422s(client, body, says):
    got = client.post("/v1/ask", json=body)
    assert got.status_code == 422 and says in got.json()["error"]["message"], got.text


def test_bodies_over_the_limit_are_413(model, store):
    limits = Limits(max_body_bytes=2000, max_upload_bytes=5000)
    with TestClient(make_app(model, store, limits=limits)) as c:
        big = c.post("/v1/ask", content=json.dumps({"question": "x" * 3000}), headers={"Content-Type": "application/json"})
        assert big.status_code == 413
        chunked = c.post("/v1/kb/triples", content=iter([b'{"name": "', b"x" * 3000, b'"}']),
                         headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413
        rows = "name,property,value\n" + "".join(f"E{i},p,v\n" for i in range(800))
        assert c.post("/v1/kb/import", files={"file": ("big.csv", rows)}).status_code == 413
        ok = "name,property,value\n" + "".join(f"E{i},p,v\n" for i in range(100))  # over 2000, under 5000
        assert c.post("/v1/kb/import", files={"file": ("ok.csv", ok)}).status_code == 200
        assert c.get("/v1/kb/triples", params={"limit": 1001}).status_code == 422
        too_many = {"triples": [{"name": f"E{i}", "property": "p", "value": "v"} for i in range(3)]}
    with TestClient(make_app(model, store, limits=Limits(max_triples=2))) as c:
        assert "at most 2" in c.post("/v1/kb/triples", json=too_many).json()["error"]["message"]


def test_an_api_key_guards_every_endpoint(model, store):
    key = "k" * 20 + "-secret"
    with TestClient(make_app(model, store, api_key=key)) as c:
        calls = [("get", "/v1/kb", {}), ("get", "/v1/kb/triples", {}), ("get", "/healthz", {}), ("get", "/metrics", {}),
                 ("post", "/v1/ask", {"json": {"question": GOLD}}), ("get", "/v1/kb/export", {}),
                 ("patch", "/v1/kb/triples", {"json": {"name": "Gold", "property": "symbol", "value": "Zz"}}),
                 ("post", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": GOLD}]}}),
                 ("get", "/v1/models", {}), ("get", "/no/such/path", {})]
        for method, path, kw in calls:
            for auth in (None, "Bearer wrong-key-of-some-length", f"Basic {key}", f"Bearer {key}x", key):
                headers = {} if auth is None else {"Authorization": auth}
                got = getattr(c, method)(path, headers=headers, **kw)
                assert got.status_code == 401 and got.headers["WWW-Authenticate"] == "Bearer", (path, auth)
                assert "API key" in got.json()["error"]["message"]
            assert getattr(c, method)(path, headers={"Authorization": f"Bearer {key}"}, **kw).status_code != 401
        for public in ("/", "/app.js", "/style.css", "/openapi.json"):
            assert c.get(public).status_code == 200
    assert triples_of(store)[[t.name for t in triples_of(store)].index("Gold")].value == "Zz"  # the keyed PATCH


def test_non_loopback_needs_a_key_and_key_files_are_checked(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    check_bind("127.0.0.1", None)
    for host in ("0.0.0.0", "::", "10.0.0.1", "myhost"):
        with pytest.raises(ValueError, match="without an API key"):
            check_bind(host, None)
        check_bind(host, "a-key")
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16"):
        read_api_key(short)
    good = tmp_path / "good"
    good.write_text("  0123456789abcdefXYZ \n")
    good.chmod(0o600)
    assert read_api_key(good) == "0123456789abcdefXYZ"


def test_cors_off_by_default_and_cross_site_writes_refused(model, store):
    with TestClient(make_app(model, store)) as c:
        got = c.get("/v1/kb", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in got.headers
        pre = c.options("/v1/kb/triples", headers={"Origin": "https://evil.example",
                                                    "Access-Control-Request-Method": "PATCH"})
        assert "access-control-allow-origin" not in pre.headers
        before = triples_of(store)
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
            hostile = c.post("/v1/kb/import", files={"file": ("x.csv", "name,property,value\nA,b,c\n")}, headers=headers)
            assert hostile.status_code == 403 and "refused" in hostile.json()["error"]["message"]
        assert triples_of(store) == before
        own = c.post("/v1/kb/triples", json={"name": "A", "property": "b", "value": "c"},
                     headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
        assert own.status_code == 201
        assert c.get("/v1/kb", headers={"Host": "evil.example"}).status_code == 400  # DNS rebinding
    with TestClient(make_app(model, store, cors_origins=["https://app.example"])) as c:
        pre = c.options("/v1/kb/triples", headers={"Origin": "https://app.example",
                                                    "Access-Control-Request-Method": "PATCH"})
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        assert c.patch("/v1/kb/triples", json={"name": "A", "property": "b", "value": "d"},
                       headers={"Origin": "https://app.example"}).status_code == 200


def test_a_loopback_server_accepts_only_loopback_host_names(model, store):
    from kblam.serve import ServeConfig, create_app

    app = create_app(model, store, ServeConfig(), encoder=model.encoder)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"Host": "localhost:8000"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "attacker.example"}).status_code == 400


# --- OpenAI's chat, health, metrics, the page -------------------------------------------------------


def test_chat_completions_with_the_openai_client(client):
    from openai import OpenAI

    ai = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    done = ai.chat.completions.create(model="anything", messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": GOLD}], max_tokens=10)
    direct = client.post("/v1/ask", json={"question": GOLD, "max_new_tokens": 10, "max_sources": 50}).json()
    assert done.choices[0].message.content == direct["answers"][0]["text"]
    assert done.model_extra["kblam"]["sources"] == direct["answers"][0]["sources"]
    pieces, final = [], None
    for chunk in ai.chat.completions.create(model="kblam", messages=[{"role": "user", "content": GOLD}],
                                            max_tokens=10, stream=True):
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices[0].finish_reason == "stop":
            final = chunk.model_extra["kblam"]
    assert len(pieces) > 1 and "".join(pieces) == done.choices[0].message.content == final["text"]
    assert [m.id for m in ai.models.list()] == ["kblam"]
    import openai

    with pytest.raises(openai.UnprocessableEntityError, match="n must be 1"):
        ai.chat.completions.create(model="kblam", messages=[{"role": "user", "content": GOLD}], n=2)
    with pytest.raises(openai.UnprocessableEntityError, match="no text"):
        ai.chat.completions.create(model="kblam", messages=[{"role": "assistant", "content": "hi"}])


def test_streams_in_one_batch_each_get_their_own_text(model, store):
    """Two streams and a plain question answered as one batch: each stream carries its own row's text."""
    questions = [GOLD, "Who discovered Oxygen?", "What is the atomic number of Iron?"]
    with TestClient(make_app(model, store, batch_window_ms=300)) as c:
        expected = [a["text"] for a in c.post("/v1/ask", json={"question": questions, "max_new_tokens": 10}).json()[
            "answers"]]
        got: dict[int, str] = {}

        def stream(i):
            body = {"messages": [{"role": "user", "content": questions[i]}], "max_tokens": 10, "stream": True}
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                text = ""
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                got[i] = text

        def plain():
            got[2] = c.post("/v1/ask", json={"question": questions[2], "max_new_tokens": 10}).json()["answers"][0]["text"]

        threads = [threading.Thread(target=stream, args=(0,)), threading.Thread(target=stream, args=(1,)),
                   threading.Thread(target=plain)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _metric(c, "kblam_batch_questions_count") == 2  # the list above, then these three together
    assert [got[i] for i in range(3)] == expected


def test_health_and_metrics(client):
    from prometheus_client.parser import text_string_to_metric_families

    assert client.get("/healthz").json() == {"status": "ok", "kb_version": 1, "kb_size": 50, "queue": 0}
    client.post("/v1/ask", json={"question": GOLD, "max_new_tokens": 4})
    client.post("/v1/ask", json={"question": "x" * 5000})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(metrics.text)}
    assert {"kblam_http_requests", "kblam_http_request_duration_seconds", "kblam_kb_triples", "kblam_queue_depth",
            "kblam_batch_questions"} <= names
    assert _metric(client, "kblam_http_requests_total", route="/v1/ask", status="200") == 1
    assert _metric(client, "kblam_http_requests_total", route="/v1/ask", status="422") == 1
    assert _metric(client, "kblam_http_request_duration_seconds_count", route="/v1/ask") == 2
    assert _metric(client, "kblam_kb_triples") == 50 and _metric(client, "kblam_queue_depth") == 0


def test_the_page_fetches_nothing_from_outside(client):
    import re

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    for path in ("/", "/app.js", "/style.css"):
        text = client.get(path).text
        urls = re.findall(r"""(?:src|href|url)\s*[=(]\s*["']?([^"')\s>]+)""", text) + re.findall(r"https?://[^\s\"'`]+", text)
        assert all(u.startswith(("/", "data:", "#", "http://www.w3.org/2000/svg")) for u in urls), (path, urls)
    assert "innerHTML" not in client.get("/app.js").text  # KB text only ever goes in as textContent


def test_the_cli_refuses_before_loading_anything(tmp_path, capsys):
    from kblam.cli import main

    assert main(["serve", str(tmp_path / "kb.kbstore"), "--host", "0.0.0.0"]) == 1
    assert "without an API key" in capsys.readouterr().err
    key = tmp_path / "key"
    key.write_text("short")
    assert main(["serve", str(tmp_path / "kb.kbstore"), "--api-key-file", str(key)]) == 1
    assert "at least 16" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "kb.kbstore"), "--port", "70000"]) == 1


def test_csv_rows_round_trip_through_the_page_format(client):
    """The CSV export is what the page's download link gets: a header and one row per triple."""
    rows = list(csv.reader(io.StringIO(client.get("/v1/kb/export", params={"format": "csv"}).text)))
    assert rows[0] == ["name", "property", "value"] and len(rows) == 51


def test_a_kb_file_is_imported_into_a_store_beside_it_once(model, tmp_path):
    from kblam.kb import KBFormatError
    from kblam.serve.cli import _store_for

    source = tmp_path / "facts.csv"
    source.write_bytes(ELEMENTS.read_bytes())
    store = _store_for(source, model, create=False)
    assert store == tmp_path / "facts.kbstore" and len(triples_of(store)) == 50
    source.write_text("name,property,value\nA,b,c\n")
    assert _store_for(source, model, create=False) == store and len(triples_of(store)) == 50  # not again
    bad = tmp_path / "bad.csv"
    bad.write_text("name,property,value\nA,b,c\nX,,z\n")
    with pytest.raises(KBFormatError, match="line 3"):
        _store_for(bad, model, create=False)
    assert not (tmp_path / "bad.kbstore").exists()  # never a half-imported store to serve
    with pytest.raises(FileNotFoundError, match="--create"):
        _store_for(tmp_path / "new.kbstore", model, create=False)
    assert len(triples_of(_store_for(tmp_path / "new.kbstore", model, create=True))) == 0
