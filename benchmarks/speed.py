"""Speed to the machine's limit (issue 10): each component's time beside its floor, and the issue's goals.

    .venv/bin/python benchmarks/speed.py                       # every part (~30 min on 2 shared cores)
    .venv/bin/python benchmarks/speed.py --parts machine,components --sizes 1000 10000
    .venv/bin/python benchmarks/speed.py --markdown-only       # redo docs/performance.md from the JSON

On the embedded default model (SmolLM2-135M-Instruct, the shipped adapter) with one torch thread
(--threads), KB states in the model's default dtype (--dtype to override). The goals ask synthetic KBs
encoded by the default encoder (MiniLM; --vectors real, built once under --real-workdir as KBStores:
about 75 s for 10,000 triples and 8 min for 100,000 on this machine): with random vectors the best
source of a question is a random entity, and the answer path then does what no real question makes it
do (the confidence encodes that entity's property names, its guess of the question without the name
misses). The million-triple store follows --vectors too (real: built once under --real-workdir, about
90 min here; random: under --workdir, minutes). The components and the memory use random vectors
(their cost does not depend on the answers).

Parts (--parts):
- machine: memory bandwidth (a 256 MB tensor copy: bytes read + written per second) and the matrix
  product rate in float32 and bfloat16 (1024 x 1024 products), best of several: the floors' rates.
- components: at each --sizes, the time of base prefill (one question, no KB), KB projection (the
  whole KB through the adapter: what the cache saves per question), KB attention in the prefill (the
  prefill with the KB attached minus without), the span path (the span decoder's work per call: each
  step that is not inside a quoted span, the choice of a span included) and a decoding step (one token
  of one question, with and without the KB), each beside its floor: the larger of its FLOPs at the
  measured product rate and its bytes at the measured bandwidth (the model is in docs/performance.md).
- goals: the issue's ratios, each side measured alternately in this one process so that load on
  the machine weighs on both: time to first token (ask, max_new_tokens=1, a new question each time,
  --ttft-repeats questions a side: the first questions of a process run slower, 5 gave medians 5% apart)
  at 10K and 100K triples with full attention and at 100K with the pre-filter; 16 questions as one
  batch for exactly 17 steps; answers per second for batches of 1, 4, 16 and 64; decoding tokens per
  second (exactly --decode-steps steps, one forward pass each: generate with the KB attached; also with
  the second thread off, which keeps each step's KB attention on one thread); an
  answer's tokens per second after its first (ask, which reads a quoted span in one pass); asking
  again after editing one triple of a 100K-triple KnowledgeBase (full attention).
- million: time to first token with the pre-filter over a 1,000,000-triple KBStore (--vectors), beside
  no KB, in a child process: as a new process reads it (its row checksums saved by KBStore.check() in
  another process, as `kblam kb index` does), taking turns with other questions read without those
  checksums (whole blocks hashed) and with no-KB questions; then the process's next questions with the
  checksums; then after KBStore.check() in this process; and edits of a copy of it.
- memory: peak resident memory after loading, asking one question with full attention over KBs of
  --memory-sizes triples, each in a fresh child process (--memory-repeats of them a size); the slope is the
  memory per added triple (the method of benchmarks/cost.py, which measured 14.7 KB before the cache), and
  that of the peak above the caller's KB once built (its triples, its embeddings when given): kblam's own. The KB is given as
  float32 KBEmbeddings the caller holds (as cost.py gave it), and, in bfloat16, as a KnowledgeBase of
  triples that the model's encoder encodes (a user's KB from a CSV: the encoder keeps its texts' vectors,
  the KB cache its embeddings; the encoder here is the bench stores' fixed random vectors, not MiniLM).
- encoding: MiniLM's own rate on distinct texts, against KBStore.add of the triples they come from.

Writes benchmarks/results/speed.json and the tables in docs/performance.md between its markers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cost import _StepClock as StepClock  # noqa: E402 - a logits processor noting when each step's logits are ready

OUT = ROOT / "benchmarks" / "results" / "speed.json"
DOCS = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- speed-results:begin -->", "<!-- speed-results:end -->"
PARTS = ("machine", "components", "goals", "million", "memory", "encoding")


# ----------------------------------------------------------------------------------------- helpers

def _best(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _median(xs):
    return statistics.median(xs) if xs else None


def _alternate(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of a() and of b(), run alternately (contention weighs on both alike). A function
    that returns a float measured itself (time to first token): that is its time."""
    return tuple(_taking_turns([a, b], repeats))


def _taking_turns(fns, repeats: int) -> list[float]:
    """Median seconds of each function, the functions run in turn `repeats` times (see _alternate)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, took in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            got = fn()
            took.append(got if isinstance(got, float) else time.perf_counter() - t0)
    return [_median(took) for took in times]


def _random_kb(n: int, seed: int = 0, dim: int = 384):
    import torch
    from scale import _synthetic

    from kblam.encoder import KBEmbeddings

    g = torch.Generator().manual_seed(seed)
    triples = tuple(_synthetic(n, seed=seed))
    return KBEmbeddings(triples, torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g))


def _real_kb(n: int, workdir: Path):
    """KBEmbeddings of n synthetic triples encoded by the default encoder, from a KBStore that
    benchmarks/scale.py's build makes once under workdir (and reuses)."""
    from scale import child_build

    from kblam.store import KBStore

    built = child_build(n, str(workdir), real=True)
    with KBStore.open(built["store"], readonly=True) as store:
        return store.embeddings()


def _questions(kb, count: int, offset: int = 0) -> list[str]:
    """Distinct questions about the KB's triples (the encoder's cache never answers for them)."""
    step = max(1, len(kb) // max(count, 1))
    return [f"What is the {t.property} of {t.name}?" for t in kb.triples[offset::step][:count]]


@contextlib.contextmanager
def _token_by_token():
    """Quoted spans read a token a pass (kblam.spans.READ_SPANS_WHOLE off), as before they were read whole."""
    from kblam import spans

    before, spans.READ_SPANS_WHOLE = spans.READ_SPANS_WHOLE, False
    try:
        yield
    finally:
        spans.READ_SPANS_WHOLE = before


class Steps:
    """A stopping criterion: exactly `n` new tokens (with min_new_tokens=n, so no early end of text)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, input_ids, scores, **_):
        import torch

        self.calls += 1
        return torch.full((input_ids.shape[0],), self.calls >= self.n, dtype=torch.bool)


def _load(dtype: str | None):
    import torch

    from kblam import KBLaM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = KBLaM.from_pretrained()
    model.encoder.progress = False
    if dtype:
        model.kb_cache.dtype = getattr(torch, dtype)
    return model


def _shape(model) -> dict:
    base = model.base
    c = base.config
    emb = base.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in base.parameters())
    return {"layers": c.num_hidden_layers, "kb_layers": len(model.config.kb_layers),
            "heads": model.config.num_attention_heads, "kv_heads": model.config.num_key_value_heads,
            "head_dim": model.config.head_dim, "hidden": c.hidden_size, "params": params,
            "params_without_embeddings": params - emb, "vocab": c.vocab_size,
            "encoder_dim": model.config.encoder_dim, "null_slot": int(model.config.null_slot),
            "param_bytes": sum(p.numel() * p.element_size() for p in base.parameters())}


# ----------------------------------------------------------------------------------------- machine

def machine(threads: int) -> dict:
    import platform

    import torch

    src = torch.randn(64 * 2**20)  # 256 MB
    dst = torch.empty_like(src)
    copy_s = _best(lambda: dst.copy_(src), 7)
    out = {"torch": torch.__version__, "threads": threads, "cores": os.cpu_count(),
           "cpu": _cpu_name() or platform.machine(), "bandwidth_gbs": round(2 * src.nbytes / copy_s / 1e9, 1)}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(1024, 1024).to(dtype), torch.randn(1024, 1024).to(dtype)
        seconds = _best(lambda a=a, b=b: torch.mm(a, b), 9)
        out[f"gflops_{name}"] = round(2 * 1024**3 / seconds / 1e9, 1)
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------------------- floors

def floors(shape: dict, m: int, prompt: int, state_bytes: int, rates: dict, batch: int = 1) -> dict:
    """Each component's floor in seconds: max(FLOPs / product rate, bytes / bandwidth)."""
    bw = rates["bandwidth_gbs"] * 1e9
    f32, kb_rate = rates["gflops_float32"] * 1e9, rates[f"gflops_{'bfloat16' if state_bytes == 2 else 'float32'}"] * 1e9
    s = shape
    m1 = m + s["null_slot"]
    kv = s["kv_heads"] * s["head_dim"]
    states = m1 * kv * 2 * s["kb_layers"] * state_bytes  # KB keys + values, every KB layer
    attn_flops = 4 * s["heads"] * s["head_dim"] * m1 * s["kb_layers"]  # per query row: scores + mix

    def floor(flops, nbytes, rate=f32):
        return max(flops / rate, nbytes / bw)

    return {
        "base_prefill": floor(2 * s["params_without_embeddings"] * prompt * batch, s["param_bytes"]),
        "kb_projection": floor(m * s["kb_layers"] * 2 * 2 * s["encoder_dim"] * kv,
                               m * s["encoder_dim"] * 4 * 2 + states),
        "kb_attention_prefill": floor(attn_flops * prompt * batch, states, kb_rate),
        "span_step": floor(0, 2 * batch * m1 * 4),  # read the KB attention, write the span scores
        "decode_step_base": floor(2 * s["params_without_embeddings"] * batch, s["param_bytes"]),
        "decode_step_kb": floor(attn_flops * batch, states, kb_rate),
    }


# ----------------------------------------------------------------------------------------- components

def components(model, sizes: list[int], rates: dict, repeats: int) -> list[dict]:
    rows = []
    for m in sizes:
        rows.append(component_row(model, m, rates, repeats))
        print(f"[speed] components {m:,}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        model.kb_cache.clear()
    return rows


def component_row(model, m: int, rates: dict, repeats: int) -> dict:
    import torch

    from kblam import kb_cache, spans
    from kblam.model import KBAttentionRecorder, question_token_mask

    kb = _random_kb(m)
    question = _questions(kb, 1)[0]
    prompt = model.format_prompt(question)
    inputs = model.tokenizer([prompt], return_tensors="pt", add_special_tokens=False, return_offsets_mapping=True)
    offsets = inputs.pop("offset_mapping")
    dtype = model.kb_cache.dtype
    projection = _best(lambda: kb_cache.project(model.adapter, kb.keys, kb.values, dtype), 2 if m > 20_000 else 3)
    states = model.kb_states(kb)
    model.kb_layers(states)
    mask = question_token_mask([prompt], [question], offsets, inputs["attention_mask"])

    def prefill(with_kb: bool):
        with torch.no_grad():
            if not with_kb:
                return model.base(**inputs, logits_to_keep=1)
            with model.attach(states, record=KBAttentionRecorder(mask), questions=[question], tap=True, copy=False):
                return model.base(**inputs, logits_to_keep=1)

    with_kb, without = _alternate(lambda: prefill(True), lambda: prefill(False), repeats)

    spent, inner = [], spans.SpanDecoder.__call__

    def timed(self, input_ids, scores):  # the span decoder's own time, per step
        t0 = time.perf_counter()
        try:
            return inner(self, input_ids, scores)
        finally:
            spent.append(time.perf_counter() - t0)

    def decode(kb_or_none, steps=24) -> float:
        """The median decoding step of `steps` tokens."""
        times = _decode_times(model, question, kb_or_none, steps, inputs)
        return _median([b - a for a, b in zip(times[1:], times[2:], strict=False)])

    steps_kb, steps_no = [], []
    for _ in range(max(2, repeats // 2)):
        steps_kb.append(decode(kb))
        steps_no.append(decode(None))
    spans.SpanDecoder.__call__ = timed
    try:  # the decoder is called at the steps the LM or a span's choice makes (not inside a span, read whole)
        for asked in _questions(kb, 3, offset=1):
            model.ask(asked, kb, max_new_tokens=24, prefilter=False, min_confidence=0.0)
    finally:
        spans.SpanDecoder.__call__ = inner
    step_kb, step_no = _median(steps_kb), _median(steps_no)
    return {
        "triples": m, "prompt_tokens": inputs["input_ids"].shape[1], "state_dtype": str(dtype).removeprefix("torch."),
        "base_prefill_s": without, "kb_projection_s": projection, "kb_attention_prefill_s": with_kb - without,
        "span_step_s": _median(spent), "decode_step_base_s": step_no, "decode_step_kb_s": step_kb - step_no,
        "floors_s": floors(_shape(model), m, inputs["input_ids"].shape[1], dtype.itemsize, rates),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _decode_times(model, question: str, kb, steps: int, inputs=None) -> list[float]:
    """When each of exactly `steps` tokens' logits were ready, one forward pass a token: generate with the
    KB attached (or none), no span decoder (ask reads a quoted span in one pass, kblam.spans.generate)."""
    if inputs is None:
        inputs = model.tokenizer([model.format_prompt(question)], return_tensors="pt", add_special_tokens=False)
    clock = StepClock()
    model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], kb=kb,
                   questions=None if kb is None else [question], max_new_tokens=steps, min_new_tokens=steps,
                   do_sample=False, logits_processor=[clock])
    return clock.times


# ----------------------------------------------------------------------------------------- goals

def _ttft(model, kb, questions, **kw):
    """A function asking the next question, returning its time to first token: from the call to the first
    token's logits (a span started at the first token goes on being quoted after it)."""
    it = iter(questions)

    def ttft() -> float:
        clock = StepClock()
        t0 = time.perf_counter()
        model.ask(next(it), kb, max_new_tokens=1, logits_processor=[clock], **kw)
        return clock.times[0] - t0

    return ttft


@contextlib.contextmanager
def _second_thread_off(model):
    """The model's answers on the asking thread only (kblam.second_thread off) within; its setting after."""
    setting, model.second_thread = model.second_thread, False
    try:
        yield
    finally:
        model.second_thread = setting


# Issue 10's time-to-first-token goals at 10,000 and 100,000 triples: (key, triples, pre-filter, label, target).
TTFT_GOALS = (("10000_full", 10_000, False, "10,000 triples, full attention", 1.5),
              ("100000_full", 100_000, False, "100,000 triples, full attention", 4),
              ("100000_prefilter", 100_000, True, "100,000 triples, pre-filter", 1.3))


def goals(model, repeats: int, decode_steps: int, batch_sizes: list[int], real_workdir: Path | None = None,
          ttft_repeats: int = 25, decode_repeats: int = 8) -> dict:
    out: dict = {"load_average_start": [round(x, 2) for x in os.getloadavg()], "ttft_questions": ttft_repeats}
    kbs = {m: _real_kb(m, real_workdir) if real_workdir else _random_kb(m, seed=1) for m in (10_000, 100_000)}
    out["vectors"] = "MiniLM" if real_workdir else "random"
    for kb in kbs.values():
        model.ask("warm up", kb, max_new_tokens=1, prefilter=False)  # projected once: the cache's state
    nokb_questions = [f"What is the capital of country number {i}?" for i in range(4 * ttft_repeats + 4)]

    def ttft_goal(m: int, prefilter: bool, offset: int, nokb: list[str]) -> dict:
        """Time to first token over the m-triple KB against no KB, questions taking turns."""
        qs = _questions(kbs[m], ttft_repeats + 1, offset=offset)
        kb_s, no_s = _alternate(_ttft(model, kbs[m], qs, prefilter=prefilter), _ttft(model, None, nokb), ttft_repeats)
        return {"kb_s": kb_s, "nokb_s": no_s, "ratio": kb_s / no_s}

    for key, m, pre, _, _ in TTFT_GOALS:
        if pre:
            model.prefilter_index(kbs[m])
        out[f"ttft_{key}"] = ttft_goal(m, pre, 5 if pre else 3, nokb_questions[2:] if pre else nokb_questions)
    # The same with the answer's work on the asking thread only (kblam.second_thread off): what a process whose
    # torch threads take every core gets, and what these goals measured before the second thread.
    from kblam import second_thread

    out["second_thread"] = second_thread.wanted(model.second_thread)
    with _second_thread_off(model):
        for key, m, pre, _, _ in TTFT_GOALS:
            out[f"ttft_{key}_one_thread"] = ttft_goal(m, pre, 45 if pre else 40, nokb_questions[3:])
    print(f"[speed] goals so far {json.dumps(out)}", file=sys.stderr, flush=True)

    kb = kbs[10_000]

    def batch(size: int, with_kb: bool, steps: int = 17):
        qs = _questions(kb, size, offset=size + 7)
        return lambda: model.ask(qs, kb if with_kb else None, max_new_tokens=steps, min_new_tokens=steps,
                                 stopping_criteria=[Steps(steps)], prefilter=False, min_confidence=0.0)

    with _token_by_token():  # fixed work: 17 passes of 17 tokens (a span read whole would add tokens to a pass)
        kb_s, no_s = _alternate(batch(16, True), batch(16, False), max(2, repeats // 2))
        out["batch16_17_tokens_10000"] = {"kb_s": kb_s, "nokb_s": no_s, "ratio": kb_s / no_s}
        out["answers_per_s_10000"] = {}
        for size in batch_sizes:
            kb_s, no_s = _alternate(batch(size, True), batch(size, False), 1 if size >= 64 else 2)
            out["answers_per_s_10000"][size] = {"kb": size / kb_s, "nokb": size / no_s}
    print(f"[speed] goals so far {json.dumps(out)}", file=sys.stderr, flush=True)

    def answers(whole: bool):
        """16 questions as one batch, each answer as long as it is (ask), spans read whole or a token a pass."""
        qs = _questions(kb, 16, offset=5)

        def run():
            with contextlib.nullcontext() if whole else _token_by_token():
                model.ask(qs, kb, max_new_tokens=decode_steps, prefilter=False)
        return run

    whole_s, token_s = _alternate(answers(True), answers(False), 2)
    out["batch16_answers_10000"] = {"whole_answers_per_s": 16 / whole_s, "token_answers_per_s": 16 / token_s,
                                    "speedup": token_s / whole_s}

    question = _questions(kb, 1, offset=11)[0]

    def decode(with_kb: bool):
        """Tokens per second, exactly decode_steps of them."""
        times = _decode_times(model, question, kb if with_kb else None, decode_steps)
        return (len(times) - 1) / (times[-1] - times[0])

    def decode_one_thread() -> float:
        """decode(True) with the decoding steps' KB on the asking thread only (second thread off)."""
        with _second_thread_off(model):
            return decode(True)

    speeds = [(decode(True), decode(False), decode_one_thread()) for _ in range(decode_repeats)]
    kb_tps, no_tps = _median([s[0] for s in speeds]), _median([s[1] for s in speeds])
    one_tps = _median([s[2] for s in speeds])
    out["decode_tokens_per_s_10000"] = {"kb": kb_tps, "nokb": no_tps, "ratio": kb_tps / no_tps,
                                        "steps": decode_steps}
    out["decode_tokens_per_s_10000_one_thread"] = {"kb": one_tps, "nokb": no_tps, "ratio": one_tps / no_tps,
                                                   "steps": decode_steps}

    def answer_rate(with_kb: bool, question: str):
        """An answer's tokens after the first per second, from its first token's logits to its end (ask: a
        quoted span is read in one pass)."""
        clock = StepClock()
        got = model.ask(question, kb if with_kb else None, max_new_tokens=decode_steps, prefilter=False,
                        logits_processor=[clock])
        end = time.perf_counter()
        tokens = len(model.tokenizer(got.text, add_special_tokens=False)["input_ids"])
        return (tokens - 1) / (end - clock.times[0]), tokens

    rates = [(answer_rate(True, q), answer_rate(False, q)) for q in _questions(kb, max(2, repeats), offset=13)]
    kb_rate, no_rate = _median([r[0][0] for r in rates]), _median([r[1][0] for r in rates])
    out["answer_tokens_per_s_10000"] = {"kb": kb_rate, "nokb": no_rate, "ratio": kb_rate / no_rate,
                                        "kb_tokens": _median([r[0][1] for r in rates]),
                                        "nokb_tokens": _median([r[1][1] for r in rates])}
    # As many edits as time-to-first-token questions: with 5, the median moved by 0.2x between runs (1.02x to
    # 1.24x for the same code), the margin it is judged by.
    out.update(edit_goal(model, ttft_repeats))
    out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _fixed_vectors():
    """A KBEncoder of scale.py's fixed random vectors under MiniLM's name (the bench stores' encoder)."""
    import torch
    from scale import MINILM, FixedRandomVectors

    from kblam.encoder import KBEncoder

    class Vectors(FixedRandomVectors):  # as a sentence-transformers model returns them to KBEncoder
        def encode(self, texts, **kw):
            return torch.from_numpy(super().encode(texts, **kw))

    return KBEncoder(Vectors(), name=MINILM)


def _edits(model, kb, pairs, prefilter: bool) -> tuple[list[float], list[float]]:
    """For each (asked, edited) triple pair: the time to first token of a question about `asked`, and the
    time of editing `edited` (a new value) plus that of a question about it, alternately."""
    asked, edited = [], []
    for i, (a, target) in enumerate(pairs):  # to the first token's logits, as _ttft (a span runs on after it)
        asked.append(_ttft(model, kb, [f"What is the {a.property} of {a.name}?"], prefilter=prefilter)())
        t0 = time.perf_counter()
        kb.update(target.name, target.property, f"edited value {i}")
        edit_s = time.perf_counter() - t0
        edited.append(edit_s + _ttft(model, kb, [f"What is the {target.property} of {target.name}?"],
                                     prefilter=prefilter)())
    return asked, edited


def edit_goal(model, repeats: int, m: int = 100_000) -> dict:
    """Ask, edit one triple, ask again, over a 100K-triple KnowledgeBase with full attention."""
    from scale import _synthetic

    from kblam.kb import KnowledgeBase

    encoder, model.encoder = model.encoder, _fixed_vectors()  # no MiniLM for 200K texts
    try:
        kb = KnowledgeBase(_synthetic(m, seed=2))
        t0 = time.perf_counter()
        model.ask("warm up", kb, max_new_tokens=1, prefilter=False)
        first = time.perf_counter() - t0
        names = [t for t in kb.triples[:: m // (2 * repeats + 2)]][: 2 * repeats + 2]
        asked, edited = _edits(model, kb, list(zip(names[0::2], names[1::2], strict=False))[:repeats], prefilter=False)
        a, e = _median(asked), _median(edited)
        return {"edit_100000_full": {"ask_s": a, "edit_and_ask_s": e, "ratio": e / a, "first_ask_s": first,
                                     "updates": model.kb_cache.updates}}
    finally:
        model.encoder = encoder


# ----------------------------------------------------------------------------------------- children

def child(task: dict) -> dict:
    import torch

    torch.set_num_threads(task["threads"])
    if task["kind"] == "memory":
        return child_memory(task)
    if task["kind"] == "million":
        return child_million(task)
    return child_encoding(task)


def child_memory(task: dict) -> dict:
    from cost import _hwm_mb, _reset_peak, _rss_mb
    from scale import _synthetic

    from kblam.kb import KnowledgeBase

    model = _load(task["dtype"])
    triples = task.get("input") == "knowledge-base"
    if triples:
        model.encoder = _fixed_vectors()
    model.ask("warm up", KnowledgeBase(_synthetic(4, seed=5)) if triples else _random_kb(4), max_new_tokens=2)
    before = _rss_mb()
    # numba's kernels (kblam.few_rows), a one-time import of ~100 MB: from_pretrained starts loading them on a
    # thread of their own (one torch thread); waited for here, so that the load is not on the question's peak
    # (it would weigh on the per-triple slope as if it grew with the KB)
    from kblam import few_rows

    few_rows._load()
    rss = _rss_mb()
    reset = _reset_peak()
    kb = KnowledgeBase(_synthetic(task["size"])) if triples else _random_kb(task["size"])
    built = _rss_mb()  # the caller's KB: its triples (and the float32 embeddings it gives)
    model.ask(_questions(kb, 1)[0], kb, max_new_tokens=4, prefilter=False)
    return {"size": task["size"], "dtype": str(model.kb_cache.dtype).removeprefix("torch."), "rss_loaded_mb": rss,
            "rss_kb_built_mb": built, "peak_after_load_mb": _hwm_mb() if reset else None,
            "kernels_import_mb": rss - before}


def child_million(task: dict) -> dict:
    from scale import child_build

    from kblam.store import KBStore

    built = child_build(1_000_000, task["workdir"], real=task["real"])
    model = _load(task["dtype"])
    store = KBStore.open(built["store"], readonly=True)
    t0 = time.perf_counter()
    model.prefilter_index(store)
    index_s = time.perf_counter() - t0
    n, count = task["ttft_repeats"], len(store)
    view = store.view()  # only the questions' own rows are read: no block checked before the first question

    step = count // (n + 2)

    def questions(series: int, k: int) -> list[str]:
        """Questions about other entities for each series (an entity's facts are neighbouring rows): a
        series asking about the entities of an earlier one would find their candidates read already."""
        first = 7 + series * step // 4
        return [f"What is the {t.property} of {t.name}?" for t in view.triples.take(range(first, count, step)[:k])]

    def series(qs: list[str], offset: int) -> dict:
        nokb = [f"What is the capital of country number {i + offset}?" for i in range(n)]
        kb_s, no_s = _alternate(_ttft(model, store, qs, prefilter=True), _ttft(model, None, nokb), n)
        return {"kb_s": kb_s, "nokb_s": no_s, "ratio": kb_s / no_s}

    qs = questions(0, n + 1)
    model.ask(qs[-1], store, max_new_tokens=1, prefilter=True)
    # A new process's first questions, as it reads the store with the row checksums that check() saved
    # (kblam.store.rowsums), and, taking turns with them, other questions read as without them (a store
    # never checked: each question's candidates' whole blocks hashed the first time one of their rows is
    # read): the same process, so that its first questions' slowness weighs on both alike.
    with_sums = _ttft(model, store, qs, prefilter=True)
    asked_without = _ttft(model, store, questions(1, n), prefilter=True)

    def without_sums() -> float:
        saved, store._row_sums = store._row_sums, [store._manifest["files"]["keys"]["name"], None]
        try:
            return asked_without()
        finally:
            store._row_sums = saved

    kb_s, blocks_s, no_s = _taking_turns([with_sums, without_sums, _ttft(model, None, [
        f"What is the capital of country number {i}?" for i in range(n)])], n)
    out = {"ttft_1000000_prefilter": {"kb_s": kb_s, "nokb_s": no_s, "ratio": kb_s / no_s, "index_build_s": index_s,
                                      "index": repr(model.prefilter_index(store)), "row_sums_s": built.get("row_sums_s")},
           "ttft_1000000_prefilter_block_checks": {"kb_s": blocks_s, "nokb_s": no_s, "ratio": blocks_s / no_s},
           "million_vectors": "MiniLM" if task["real"] else "random"}
    # The same process's next questions, the store still read through the row checksums (no check()):
    # what a process's first questions pay beyond its later ones, checks aside.
    out["ttft_1000000_prefilter_later"] = series(questions(2, n), 300)
    # And once every block's checksum is checked in this process (KBStore.check, as kblam serve does).
    t0 = time.perf_counter()
    store.check()
    check_s = time.perf_counter() - t0
    out["ttft_1000000_prefilter_checked"] = {**series(questions(3, n), 100), "check_s": check_s}
    step = count // (2 * n + 2)  # the edits ask and edit in turns: the same entities for both sides
    pairs = list(zip(view.triples.take(range(11, count, step)), view.triples.take(range(13, count, step)), strict=False))
    store.close()
    # Edits, on a copy of the store (the cached one stays as built): the first edit a process makes loads
    # the store's name index (kblam.store.names; before it, it read every triple), later ones do not.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(built["store"], Path(tmp) / "kb", ignore=shutil.ignore_patterns("writer.lock"))
        with KBStore.open(Path(tmp) / "kb", _fixed_vectors()) as copy:
            _, first_edited = _edits(model, copy, pairs[:1], prefilter=True)
            asked, edited = _edits(model, copy, pairs[1:n + 1], prefilter=True)
    a, e = _median(asked), _median(edited)
    out["edit_1000000_store_prefilter"] = {"ask_s": a, "edit_and_ask_s": e, "ratio": e / a,
                                           "first_edit_and_ask_s": first_edited[0]}
    return out


def child_encoding(task: dict) -> dict:
    from scale import _synthetic

    from kblam.defaults import load_default_encoder
    from kblam.store import KBStore

    encoder = load_default_encoder()
    triples = _synthetic(task["size"], seed=3)
    texts = list(dict.fromkeys([t.key_text() for t in triples] + [t.value_text() for t in triples]))
    t0 = time.perf_counter()
    encoder.model.encode(texts, batch_size=encoder.batch_size, convert_to_tensor=True, show_progress_bar=False)
    own = len(texts) / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = load_default_encoder()  # no per-text cache carried over
        t0 = time.perf_counter()
        with KBStore.create(Path(tmp) / "kb", fresh) as store:
            store.add(triples, progress=True)  # the progress bar is part of what is measured
        store_rate = len(texts) / (time.perf_counter() - t0)
    return {"encoding": {"texts": len(texts), "encoder_texts_per_s": own, "store_texts_per_s": store_rate,
                         "ratio": store_rate / own}}


def run_child(task: dict, timeout: float = 3600) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(task)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    return {"error": f"exit code {proc.returncode}: {tail}"}


def memory_slope(runs: list[dict]) -> dict | None:
    from cost import linear_fit

    ok = [r for r in runs if r.get("peak_after_load_mb") is not None]
    if len(ok) < 2:
        return None
    sizes = [r["size"] for r in ok]
    fit = linear_fit(sizes, [r["peak_after_load_mb"] for r in ok])
    # kblam's own part: the peak above what the caller's KB took (its triples, its embeddings when given)
    own = linear_fit(sizes, [r["peak_after_load_mb"] - r.get("rss_kb_built_mb", r["rss_loaded_mb"]) for r in ok])
    return {"kb_per_triple": fit["slope"] * 1024, "r2": fit["r2"], "sizes": sorted(set(sizes)),
            "processes": len(ok), "own_kb_per_triple": own["slope"] * 1024}


# ----------------------------------------------------------------------------------------- report

COMPONENTS = (("base prefill (one question, no KB)", "base_prefill_s", "base_prefill"),
              ("KB projection (whole KB, once per version)", "kb_projection_s", "kb_projection"),
              ("KB attention, prefill (one question)", "kb_attention_prefill_s", "kb_attention_prefill"),
              ("span path, per call (a step that is not inside a span)", "span_step_s", "span_step"),
              ("decoding step, base (one question)", "decode_step_base_s", "decode_step_base"),
              ("decoding step, KB's share", "decode_step_kb_s", "decode_step_kb"))


def _ms(x) -> str:
    return "" if x is None else f"{x * 1e3:,.1f}"


def markdown(results: dict) -> str:
    mach = results.get("machine", {})
    lines = [f"Measured {results.get('when', '?')}: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores, "
             f"torch {mach.get('torch', '?')} with {mach.get('threads', '?')} thread(s); load average at the start "
             f"{mach.get('load_average')} (the machine was shared: see the note above). Measured rates: memory "
             f"bandwidth {mach.get('bandwidth_gbs')} GB/s, products {mach.get('gflops_float32')} GFLOP/s in float32, "
             f"{mach.get('gflops_bfloat16')} in bfloat16.", ""]
    rows = results.get("components") or []
    if rows:
        lines += ["| component | " + " | ".join(f"{r['triples']:,} triples: measured / floor (ms)" for r in rows) + " |",
                  "|---|" + "---:|" * len(rows)]
        for label, key, floor in COMPONENTS:
            cells = [f"{_ms(r.get(key))} / {_ms(r['floors_s'][floor])}" for r in rows]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", f"Prompt: {rows[0]['prompt_tokens']} tokens; KB states in {rows[0]['state_dtype']}; load "
                      f"average during the rows: {', '.join(str(r['load_average'][0]) for r in rows)}.", ""]
    g = results.get("goals") or {}
    if g:
        lines += ["| goal | measured | target | met |", "|---|---:|---:|---|"]

        def row(label, key, target, better="<="):
            v = g.get(key)
            if not v or "ratio" not in v:
                return
            met = v["ratio"] <= target if better == "<=" else v["ratio"] >= target
            detail = ", ".join(f"{k} {x:.3f}" for k, x in v.items() if k != "ratio" and isinstance(x, float))
            lines.append(f"| {label} ({detail}) | {v['ratio']:.2f}x | {better} {target}x | {'yes' if met else 'no'} |")

        for key, _, _, label, target in TTFT_GOALS:
            row(f"TTFT, {label} / no KB", f"ttft_{key}", target)
        for key, _, _, label, target in TTFT_GOALS:
            row(f"TTFT, {label} / no KB, without the second thread (one thread only)", f"ttft_{key}_one_thread",
                target)
        row("TTFT, 1,000,000 triples (store), pre-filter / no KB, a new process (row checksums saved by "
            "KBStore.check / kblam kb index)", "ttft_1000000_prefilter", 1.3)
        row("TTFT, 1,000,000 triples (store), pre-filter / no KB, the same process, other questions taking turns "
            "with those above, read without the row checksums (whole blocks hashed)", "ttft_1000000_prefilter_block_checks", 1.3)
        row("TTFT, 1,000,000 triples (store), pre-filter / no KB, the same process's next questions, with the row "
            "checksums (nothing checked)", "ttft_1000000_prefilter_later", 1.3)
        row("TTFT, 1,000,000 triples (store), pre-filter / no KB, every block checked first (KBStore.check)",
            "ttft_1000000_prefilter_checked", 1.3)
        row("16 questions x 17 tokens, 10,000 triples / no KB", "batch16_17_tokens_10000", 1.5)
        row("decoding tokens/s, 10,000 triples / no KB (one pass a token)", "decode_tokens_per_s_10000", 0.9, ">=")
        row("decoding tokens/s, 10,000 triples / no KB (one pass a token), without the second thread (one thread "
            "only)", "decode_tokens_per_s_10000_one_thread", 0.9, ">=")
        row("edit one triple + ask / ask, 100,000 triples, full attention", "edit_100000_full", 1.2)
        for key, given in (("memory_per_triple", "float32 KBEmbeddings held by the caller"),
                           ("memory_per_triple_kb", "a KnowledgeBase the model's encoder encodes")):
            for dtype, fit in (g.get(key) or {}).items():
                if fit:
                    own = f", kblam's own {fit['own_kb_per_triple']:.1f} KB" if "own_kb_per_triple" in fit else ""
                    lines.append(f"| memory per added triple, full attention, {dtype} states, {given} (sizes "
                                 f"{fit['sizes']}, {fit.get('processes', len(fit['sizes']))} processes, r2 "
                                 f"{fit['r2']:.3f}{own}) | {fit['kb_per_triple']:.1f} KB | <= 7.35 KB | "
                                 f"{'yes' if fit['kb_per_triple'] <= 7.35 else 'no'} |")
        enc = g.get("encoding")
        if enc:
            lines.append(f"| KB encoding into a store / the encoder's own rate ({enc['texts']:,} texts: "
                         f"{enc['store_texts_per_s']:.0f} vs {enc['encoder_texts_per_s']:.0f} texts/s) | "
                         f"{enc['ratio']:.2f}x | >= 0.9x | {'yes' if enc['ratio'] >= 0.9 else 'no'} |")
        aps = g.get("answers_per_s_10000")
        if aps:
            lines += ["", "Batches of 17 tokens a question, a token a pass:", "",
                      "| batch size | answers/s, no KB | answers/s, 10,000 triples | ratio |", "|---:|---:|---:|---:|"]
            for size, v in aps.items():
                lines.append(f"| {size} | {v['nokb']:.2f} | {v['kb']:.2f} | {v['nokb'] / v['kb']:.2f}x |")
        sentences = {  # one paragraph per measurement that has one
            "answer_tokens_per_s_10000": lambda v: (
                f"Answers (ask, a quoted span read in one pass), tokens after the first per second: {v['kb']:.1f} "
                f"with 10,000 triples ({v['kb_tokens']:.0f} tokens, median), {v['nokb']:.1f} without a KB "
                f"({v['nokb_tokens']:.0f} tokens): {v['ratio']:.2f}x."),
            "edit_1000000_store_prefilter": lambda v: (
                f"Editing one triple of the 1,000,000-triple store and asking about it, pre-filtered: "
                f"{v['edit_and_ask_s']:.3f} s against {v['ask_s']:.3f} s for a question without an edit "
                f"({v['ratio']:.2f}x); the first edit of a process and its question, {v['first_edit_and_ask_s']:.1f} s "
                f"(it loads the store's name index)."),
            "batch16_answers_10000": lambda v: (
                f"16 questions as one batch (ask, each answer as long as it is, 10,000 triples): "
                f"{v['whole_answers_per_s']:.2f} answers/s with quoted spans read in one pass, "
                f"{v['token_answers_per_s']:.2f} reading them a token a pass: {v['speedup']:.2f}x."),
        }
        for key, say in sentences.items():
            if g.get(key):
                lines += ["", say(g[key])]
        said = {"MiniLM": "encoded by MiniLM", "random": "random vectors"}
        lines += ["", f"KBs of the goals at 10,000 and 100,000 triples: synthetic, {said.get(g.get('vectors'), 'random vectors')}; "
                      f"the 1,000,000-triple store: {said.get(g.get('million_vectors'), 'random vectors')}.",
                  "", "The answer's work beside the prompt's forward pass on a second thread (kblam.second_thread): "
                      f"{'on' if g.get('second_thread') else 'off'} for the rows that do not say otherwise.",
                  "", f"Load average during the goals: {g.get('load_average_start')} at the start, "
                      f"{g.get('load_average_end')} at the end."]
    return "\n".join(lines)


def write_docs(results: dict, path: Path) -> None:
    from markers import write_between

    write_between(path, BEGIN, END, markdown(results), "Performance")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--memory-dtypes", default="bfloat16,float32")
    parser.add_argument("--memory-repeats", type=int, default=2,
                        help="processes per size: the slope is fitted over all (a peak moves by tens of MB between "
                             "processes of the same code)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ttft-repeats", type=int, default=25,
                        help="questions per side of a time-to-first-token goal (its median is steadier with more)")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--decode-repeats", type=int, default=8,
                        help="decodings with and without the KB, in turn, for the tokens/s goal (2 moved it by 0.05)")
    parser.add_argument("--encode-sample", type=int, default=1500, help="triples for the encoding rate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="KB state dtype (default: the model's)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="the 1M store of random vectors (default: kblam cache/bench-speed)")
    parser.add_argument("--vectors", choices=("real", "random"), default="real", help="the goals' KB vectors")
    parser.add_argument("--real-workdir", type=Path, default=None,
                        help="the MiniLM-encoded stores (default: kblam cache/bench-scale, as benchmarks/scale.py)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--markdown-only", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.markdown_only:
        write_docs(results, args.docs)
        return
    import torch

    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    results["when"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["command"] = " ".join([".venv/bin/python", "benchmarks/speed.py", *sys.argv[1:]])
    if "machine" in parts or "machine" not in results:
        results["machine"] = machine(args.threads)
        print(f"[speed] machine {json.dumps(results['machine'])}", file=sys.stderr, flush=True)
    goals_out = results.setdefault("goals", {})
    if parts & {"components", "goals"}:
        model = _load(args.dtype)
        if "components" in parts:
            results["components"] = components(model, args.sizes, results["machine"], args.repeats)
        if "goals" in parts:
            from kblam.defaults import cache_dir

            real = (args.real_workdir or cache_dir() / "bench-scale") if args.vectors == "real" else None
            goals_out.update(goals(model, args.repeats, args.decode_steps, args.batch_sizes, real, args.ttft_repeats,
                                   args.decode_repeats))
        del model
    common = {"threads": args.threads, "dtype": args.dtype}
    if "million" in parts:
        from kblam.defaults import cache_dir

        real = args.vectors == "real"
        workdir = (args.real_workdir or cache_dir() / "bench-scale") if real else args.workdir or cache_dir() / "bench-speed"
        workdir.mkdir(parents=True, exist_ok=True)
        goals_out.update(run_child({"kind": "million", "workdir": str(workdir), "real": real,
                                    "ttft_repeats": args.ttft_repeats, **common}))
    if "memory" in parts:
        goals_out["memory_per_triple"] = {}
        for dtype in args.memory_dtypes.split(","):
            runs = [run_child({"kind": "memory", "size": n, **common, "dtype": dtype})
                    for _ in range(args.memory_repeats) for n in args.memory_sizes]
            goals_out["memory_per_triple"][dtype] = memory_slope(runs)
            goals_out.setdefault("memory_runs", {})[dtype] = runs
        # A KnowledgeBase of triples, encoded by the model's encoder: what a user's KB from a CSV holds.
        runs = [run_child({"kind": "memory", "size": n, **common, "dtype": "bfloat16", "input": "knowledge-base"})
                for _ in range(args.memory_repeats) for n in args.memory_sizes]
        goals_out["memory_per_triple_kb"] = {"bfloat16": memory_slope(runs)}
        goals_out.setdefault("memory_runs", {})["knowledge-base bfloat16"] = runs
    if "encoding" in parts:
        goals_out.update(run_child({"kind": "encoding", "size": args.encode_sample, **common}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_docs(results, args.docs)
    print(markdown(results))


if __name__ == "__main__":
    main()
