"""Issue 10: kblam.few_rows, the numba product of a decoding step's few query rows with bfloat16 KB states."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import tiny_model, wrap
from test_kb_cache import QUESTIONS, _kb, _model

from kblam import KBLaM, few_rows
from kblam.adapter import CONFIG_NAME
from kblam.kb_cache import KBStateCache

pytest.importorskip("numba")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bf16_kb(heads, n, width, layout="keys"):
    """(heads, width, n) bfloat16 as the attention hands it over: a transposed view of rows ("keys": the
    scores), a plain tensor ("values": the mix, knowledge tokens x dim), or a slice of one ("other": torch
    multiplies it)."""
    if layout == "keys":
        return torch.randn(heads, n, width).to(torch.bfloat16).transpose(-1, -2)
    if layout == "values":
        return torch.randn(heads, width, n).to(torch.bfloat16)
    return torch.randn(heads, width, n + 3).to(torch.bfloat16)[..., :n]


def _counting(calls: list) -> few_rows._Kernels:
    """The loaded kernels, each call of either noted in `calls`."""
    kernels = few_rows._load()
    return few_rows._Kernels(*(lambda *a, f=f: calls.append(1) or f(*a) for f in kernels))


@pytest.mark.parametrize("layout", ["keys", "values"])
@pytest.mark.parametrize("heads,rows,width,n", [(3, 3, 64, 10_001), (3, 3, 10_001, 64), (2, 4, 64, 37),
                                                 (1, 1, 5, 3), (3, 5, 130, 9), (4, 6, 8, 4), (2, 2, 16, 1),
                                                 (3, 2, 7, 5), (2, 7, 9, 3)])
def test_the_kernel_multiplies_as_torch_does(heads, rows, width, n, layout, monkeypatch):
    x = torch.randn(heads, rows, width)
    kb = _bf16_kb(heads, n, width, layout)
    calls = []
    monkeypatch.setattr(few_rows, "_kernel", _counting(calls))
    expected = torch.bmm(x, kb.float())  # the same bfloat16 values, in float32
    got = few_rows.product(x, kb)
    assert calls == [1]
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * width ** 0.5)


def test_rows_read_where_they_lie_or_copied():
    """A slice of a softmax's columns (the KB's beside the text's) is read in place; rows with other strides
    are copied; both give the product."""
    kb = _bf16_kb(3, 16, 50)
    joint = torch.rand(1, 9, 1, 50 + 7)
    evenly = joint[..., :50].reshape(3, 3, 50)  # the layout _shared_rows gives for one question
    assert not evenly.is_contiguous()
    assert few_rows._row_array(evenly).shape == (3, 3, 57)  # the whole rows, in place
    assert few_rows._row_array(evenly).ctypes.data == joint.data_ptr()
    spaced = torch.rand(3, 8, 50)[:, ::2]  # rows 100 apart: read in place too
    assert few_rows._row_array(spaced).shape == (3, 4, 100)
    uneven = torch.rand(3, 50, 4).transpose(1, 2)  # columns apart: copied
    assert few_rows._row_array(uneven).shape == (3, 4, 50)
    for x in (evenly, spaced, uneven):
        torch.testing.assert_close(few_rows.product(x, kb), torch.bmm(x, kb.float()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("questions", [1, 3])
def test_shifted_exp2_is_torch_s_four_passes(questions, one_thread):
    """The recorded rows' probabilities in one pass: 2 ** (scores + the row's question's bias - shift), 0 where
    the bias is -inf (padding), as torch's widen, add, subtract and exp2."""
    torch.manual_seed(0)
    heads, rows, n = 3, 6 * questions, 1001
    scores = (torch.randn(heads, rows, n) * 4).to(torch.bfloat16)
    bias = torch.randn(questions, n)
    bias[:, 7:19] = float("-inf")
    which = torch.arange(rows) % questions
    shift = torch.randn(heads, rows, 1) * 3 + 6
    out = torch.empty(heads, rows, n)
    assert few_rows.shifted_exp2(scores, bias, which, shift, out)
    expected = torch.exp2(scores.float() + bias[which] - shift)
    torch.testing.assert_close(out, expected, rtol=3e-6, atol=0)
    assert not out[..., 7:19].any()
    assert few_rows.shifted_exp2(scores, None, which, shift, out)
    torch.testing.assert_close(out, torch.exp2(scores.float() - shift), rtol=3e-6, atol=0)
    torch.set_num_threads(2)  # torch's passes split between threads: the kernel declines
    assert not few_rows.shifted_exp2(scores, bias, which, shift, out)


def test_chunk_softmax_is_torch_s_running_softmax(one_thread):
    """A prompt's KB chunk to probabilities in two passes, flash-attention style, chunk after chunk: each row's
    running largest logit (base 2), the rescaling of what came before, the probabilities rounded to bfloat16
    as torch rounds them (0 where the bias is -inf), and the running sum; a row all padding stays at -inf and
    0, then takes the next chunk's tokens."""
    import math

    torch.manual_seed(0)
    rows, n = 7, 1003
    scores = [(torch.randn(rows, n) * 4).to(torch.bfloat16) for _ in range(2)]
    scores[1][2] += 20  # a row whose largest grows in the second chunk
    bias = torch.randn(n)
    bias[5:40] = float("-inf")
    padding = torch.full((n,), float("-inf"))
    # the first chunk with a bias (row 4: all padding, in a call of its own), the second without
    row_bias = [torch.stack([padding if r == 4 else bias for r in range(rows)]), torch.zeros(rows, n)]
    top, total, rescale = torch.full((rows,), float("-inf")), torch.zeros(rows), torch.empty(rows)
    probs = torch.empty(rows, n, dtype=torch.bfloat16)
    expected_top, expected_total = torch.full((rows,), float("-inf")), torch.zeros(rows)
    for chunk, s in enumerate(scores):
        if chunk == 0:
            for part, b in ((slice(0, 4), bias), (slice(4, 5), padding), (slice(5, rows), bias)):
                few_rows.chunk_softmax(s[part], b, top[part], total[part], rescale[part], probs[part])
        else:
            few_rows.chunk_softmax(s, None, top, total, rescale, probs)
        logits = (s.float() + row_bias[chunk]) / math.log(2)
        new_top = torch.maximum(expected_top, logits.amax(-1))
        safe = new_top.clamp_min(torch.finfo(torch.float32).min)
        p = torch.exp2(logits - safe[:, None])
        expected_scale = torch.exp2(expected_top - safe)
        expected_total = expected_total * expected_scale + p.sum(-1)
        expected_top = new_top
        torch.testing.assert_close(top, expected_top, rtol=1e-6, atol=0)
        torch.testing.assert_close(rescale, expected_scale, rtol=1e-5, atol=0)
        torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=0)
        # rounded as torch rounds (a last-bit tie apart, at most, from the exponentials' own rounding)
        assert (probs.float() - p.to(torch.bfloat16).float()).abs().le(p * 2 ** -7).all()
        if chunk == 0:
            assert not probs[:, 5:40].any() and not probs[4].any()
            assert top[4] == float("-inf") and total[4] == 0 and rescale[4] == 0
    assert torch.isfinite(top).all() and (total >= 1).all() and rescale[2] < 2 ** -20


def test_another_layout_is_multiplied_by_torch(monkeypatch):
    x, kb = torch.randn(2, 3, 16), _bf16_kb(2, 10, 16, layout="other")
    calls = []
    monkeypatch.setattr(few_rows, "_kernel", _counting(calls))
    got = few_rows.product(x, kb)
    bias = torch.randn(1, 1, 1, 10)  # the KB logits' bias, as attached
    into = torch.zeros(2, 3, 14)
    with_bias = few_rows.product(x, kb, bias=bias, out=into)
    # the mix's layout with a bias (no such product in the attention) is torch's too
    values = _bf16_kb(2, 10, 16, layout="values")
    torch.testing.assert_close(few_rows.product(x, values, bias=bias), torch.bmm(x.to(torch.bfloat16), values).float()
                               + bias[0, 0])
    assert not calls
    expected = torch.bmm(x.to(torch.bfloat16), kb).float()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(with_bias, expected + bias[0, 0])
    assert with_bias.data_ptr() == into.data_ptr() and not into[..., 10:].any()


def test_it_serves_a_few_rows_on_one_thread_without_autograd(one_thread, monkeypatch):
    keys = torch.zeros(1, 3, 100, 8, dtype=torch.bfloat16)
    assert not few_rows.fits(3, keys)  # autograd: training keeps torch's products
    with torch.no_grad():
        assert few_rows.fits(3, keys)
        assert not few_rows.fits(few_rows.MOST_ROWS + 1, keys)  # a prompt, a batch: oneDNN's products are faster
        assert not few_rows.fits(3, keys.float())
        assert not few_rows.fits(3, keys.expand(2, -1, -1, -1))  # one KB per question
        torch.set_num_threads(2)
        assert not few_rows.fits(3, keys)  # oneDNN splits its products between threads
        torch.set_num_threads(1)
        monkeypatch.setattr(few_rows, "ENABLED", False)
        assert not few_rows.fits(3, keys)


def test_decoding_through_the_kernel_answers_as_torch_products(hash_encoder, one_thread, monkeypatch):
    """A tiny model with bfloat16 KB states: each decoding step's KB attention goes through the kernel in one
    call a layer (2 rows per KV head), and generation picks the tokens of torch's products, with close
    scores; ask's answers (a prompt and a quoted span read in one pass: more rows, torch's products) stay
    the same."""
    model = _model(hash_encoder)
    model.kb_cache = KBStateCache(dtype=torch.bfloat16)
    kb = _kb(40)
    from kblam import attention

    calls, steps = [], []
    inner = attention._one_question_step
    monkeypatch.setattr(few_rows, "_kernel", _counting(calls))
    monkeypatch.setattr(attention, "_one_question_step", lambda *a: steps.append(1) or inner(*a))
    prompt = model.tokenizer([model.format_prompt(QUESTIONS[0])], return_tensors="pt", add_special_tokens=False)
    out = {}
    for enabled in (True, False):
        monkeypatch.setattr(few_rows, "ENABLED", enabled)
        calls.clear()
        steps.clear()
        out[enabled] = model.generate(**prompt, kb=kb, questions=QUESTIONS[:1], max_new_tokens=6, min_new_tokens=6,
                                      do_sample=False, output_scores=True, return_dict_in_generate=True)
        # 5 one-token steps after the prompt, each with one call a KB layer (scores, softmax, mixes)
        assert len(calls) == (5 * len(model.config.kb_layers) if enabled else 0)
        assert len(steps) == (5 * len(model.config.kb_layers) if enabled else 0)  # rectangular_attention's step
    assert torch.equal(out[True].sequences, out[False].sequences)
    for a, b in zip(out[True].scores, out[False].scores, strict=True):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)

    answers = model.ask(list(QUESTIONS), kb, max_new_tokens=8, min_confidence=0.0)
    monkeypatch.setattr(few_rows, "ENABLED", True)
    again = model.ask(list(QUESTIONS), kb, max_new_tokens=8, min_confidence=0.0)
    assert [(a.text, a.quoted, a.refused) for a in answers] == [(a.text, a.quoted, a.refused) for a in again]


@pytest.mark.parametrize("halves", [False, True])
def test_a_one_question_step_is_the_general_joint_softmax(halves, one_thread, monkeypatch):
    """rectangular_attention's one-question step (the whole KB attention in one kernel call, on one thread or
    split between two) gives the general path's output and recorded KB attention (the kernel's products)."""
    if halves:
        _two_threads_or_skip(monkeypatch)
    from torch import nn

    from kblam import attention

    torch.manual_seed(0)
    heads, kv_heads, dim, m, length = 6, 2, 8, 37, 5
    module, head = nn.Module().eval(), nn.Linear(16, heads * dim)
    hidden = torch.randn(1, 1, 16)
    kb_keys = torch.randn(1, kv_heads, m, dim).to(torch.bfloat16)
    kb_values = torch.randn(1, kv_heads, m, dim).to(torch.bfloat16)
    query, key, value = (torch.randn(1, h, n, dim) for h, n in ((heads, 1), (kv_heads, length), (kv_heads, length)))
    steps, inner, general = [], attention._one_question_step, attention._is_one_question_step
    monkeypatch.setattr(attention, "_one_question_step", lambda *a: steps.append(1) or inner(*a))

    def attend(bias):
        recorded = []
        inputs = attention.KBLayerInputs(hidden_states=hidden, query_head=head, keys=kb_keys, values=kb_values,
                                         bias=bias, record=recorded.extend, halves=halves)
        with torch.no_grad():
            out, _ = attention.rectangular_attention(module, query, key, value, None, 0.35, kb=inputs)
        return out, recorded[0][1]

    for bias in (torch.randn(1, 1, 1, m), -1.5):
        steps.clear()
        out, probs = attend(bias)
        assert steps  # the one-question step
        monkeypatch.setattr(attention, "_is_one_question_step", lambda *a: False)
        ref_out, ref_probs = attend(bias)
        monkeypatch.setattr(attention, "_is_one_question_step", general)
        assert len(steps) == 1 and out.shape == ref_out.shape == (1, 1, heads, dim)
        assert probs.shape == ref_probs.shape == (1, heads, 1, m)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)


def test_a_free_core_splits_decoding_steps_and_answers_the_same(hash_encoder, one_thread, monkeypatch):
    """model.second_thread (a core free for kblam) reaches the decoding steps: True splits each KB layer's
    attention between two threads, False keeps it on one; the generated tokens and ask's answers agree."""
    calls = _two_threads_or_skip(monkeypatch)
    model = _model(hash_encoder)
    model.kb_cache = KBStateCache(dtype=torch.bfloat16)
    kb = _kb(40)
    prompt = model.tokenizer([model.format_prompt(QUESTIONS[0])], return_tensors="pt", add_special_tokens=False)
    out, answers = {}, {}
    for second in (False, True):
        model.second_thread = second
        calls.clear()
        out[second] = model.generate(**prompt, kb=kb, questions=QUESTIONS[:1], max_new_tokens=6, min_new_tokens=6,
                                     do_sample=False, output_scores=True, return_dict_in_generate=True)
        assert len(calls) == (5 * len(model.config.kb_layers) if second else 0)
        answers[second] = [model.ask(q, kb, max_new_tokens=8, min_confidence=0.0) for q in QUESTIONS]
    assert torch.equal(out[True].sequences, out[False].sequences)
    for a, b in zip(out[True].scores, out[False].scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert [(a.text, a.quoted, [t for t, _ in a.sources]) for a in answers[True]] == \
        [(a.text, a.quoted, [t for t, _ in a.sources]) for a in answers[False]]


def _two_threads_or_skip(monkeypatch) -> list:
    """Every KB split between two threads from here on (MOST_TOKENS_ALONE 0); the list notes each two-thread call."""
    if not few_rows._halves_ready():
        pytest.skip("numba's threads do not start quickly here (no OpenMP or TBB threading layer)")
    kernels, calls = few_rows._load(), []
    monkeypatch.setattr(few_rows, "MOST_TOKENS_ALONE", 0)
    monkeypatch.setattr(few_rows, "_kernel", kernels._replace(
        attend_halves=lambda *a: calls.append(1) or kernels.attend_halves(*a)))
    return calls


def _joint_softmax(q_kb, q_text, keys, values, bias, text_keys, text_values):
    """torch's reference: the logits side by side, one softmax, both mixes; (out, the KB's probabilities)."""
    logits = torch.cat([torch.bmm(q_kb, keys.float().transpose(-1, -2)) + bias,
                        torch.bmm(q_text, text_keys.transpose(-1, -2))], dim=-1)
    probs = torch.softmax(logits, dim=-1)
    m = keys.shape[1]
    return torch.bmm(probs[..., :m], values.float()) + torch.bmm(probs[..., m:], text_values), probs[..., :m]


@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("heads,rows,m,length", [(3, 3, 10_001, 40), (2, 4, 37, 1), (1, 1, 1, 3), (3, 2, 9, 5)])
def test_attend_is_the_joint_softmax(halves, heads, rows, m, length, one_thread, monkeypatch):
    """few_rows.attend (a one-question step's KB attention in one call, on one thread or the KB split between
    two) gives torch's joint softmax and mixes, and the KB's probabilities: with a bias per token, masked
    tokens (-inf, a whole half of them, or all), or one number."""
    calls = _two_threads_or_skip(monkeypatch) if halves else []
    torch.manual_seed(m)
    q_kb, q_text = torch.randn(heads, rows, 64) / 4, torch.randn(heads, rows, 64) / 4
    keys, values = (torch.randn(heads, m, 64).to(torch.bfloat16) for _ in range(2))
    text_keys, text_values = torch.randn(heads, length, 64), torch.randn(heads, length, 64)
    masked = torch.randn(m)
    masked[::3] = float("-inf")
    first_half = torch.randn(m)
    first_half[:m // 2] = float("-inf")
    for bias in (torch.randn(1, 1, 1, m), masked, first_half, torch.full((m,), float("-inf")), -2.5):
        out, probs = few_rows.attend(q_kb, q_text, keys, values, bias, text_keys, text_values, probs=True,
                                     halves=halves)
        ref_out, ref_probs = _joint_softmax(q_kb, q_text, keys, values, torch.as_tensor(bias).reshape(-1),
                                            text_keys, text_values)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-7)
    assert len(calls) == (5 if halves else 0)


def test_two_threads_leave_torch_alone_and_a_forked_child_works(tmp_path):
    """numba's OpenMP threads share torch's OpenMP runtime: starting them must not change torch's thread count
    (numba sets this thread's OpenMP threads to its own). A process forked after the two threads ran
    attends on one thread (numba stops a child entering its parent's OpenMP region)."""
    script = tmp_path / "forked.py"
    script.write_text('''
import os, sys, torch
torch.set_num_threads(1)
from kblam import few_rows
if not few_rows._halves_ready():
    print("no two threads here"); sys.exit(0)
assert torch.get_num_threads() == 1, torch.get_num_threads()
few_rows.MOST_TOKENS_ALONE = 0
q, keys, tk = torch.randn(3, 3, 64) / 4, torch.randn(3, 500, 64).to(torch.bfloat16), torch.randn(3, 4, 64)
first = few_rows.attend(q, q, keys, keys, 0.0, tk, tk, probs=False, halves=True)[0]
assert torch.get_num_threads() == 1, torch.get_num_threads()
pid = os.fork()
if pid == 0:
    again = few_rows.attend(q, q, keys, keys, 0.0, tk, tk, probs=False, halves=True)[0]
    os._exit(0 if torch.allclose(again, first, rtol=1e-5, atol=1e-6) and not few_rows._halves_ready() else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
''')
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if "no two threads" in done.stdout:
        pytest.skip("numba's threads do not start quickly here")
    assert "child 0" in done.stdout, done.stdout + done.stderr


def test_without_a_working_kernel_torch_multiplies(one_thread, monkeypatch):
    """numba missing, or the kernel failing to compile: fits() is False (torch's products serve), a
    compile failure says so once, and product() still multiplies."""
    import builtins

    keys = torch.zeros(1, 3, 20, 8, dtype=torch.bfloat16)
    real_import = builtins.__import__

    def no_kernel(name, *args, **kwargs):
        if name == "kblam._few_rows_kernel":
            raise ImportError("no numba here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(few_rows, "_kernel", None)
    monkeypatch.setattr(builtins, "__import__", no_kernel)
    with torch.no_grad():
        assert not few_rows.fits(3, keys)
    monkeypatch.setattr(builtins, "__import__", real_import)

    import kblam._few_rows_kernel as compiled

    def broken(*args):
        raise RuntimeError("LLVM says no")

    monkeypatch.setattr(few_rows, "_kernel", None)
    monkeypatch.setattr(compiled, "rows_dot", broken)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="LLVM says no"):
        assert not few_rows.fits(3, keys)
    x, kb = torch.randn(3, 3, 8), keys[0].transpose(-1, -2)
    torch.testing.assert_close(few_rows.product(x, kb), torch.bmm(x.to(torch.bfloat16), kb).float())


def test_preload_loads_the_kernels_once_while_a_question_waits_for_it(monkeypatch):
    """preload compiles on a thread of its own; a question's _load meanwhile waits for that load, not a second."""
    started, release, calls = threading.Event(), threading.Event(), []

    def compiled():
        calls.append(threading.current_thread().name)
        started.set()
        release.wait(10)
        return "kernels"

    monkeypatch.setattr(few_rows, "_kernel", None)
    monkeypatch.setattr(few_rows, "_compiled", compiled)
    loading = few_rows.preload()
    assert loading is not None and started.wait(10)
    got = []
    asker = threading.Thread(target=lambda: got.append(few_rows._load()))
    asker.start()
    asker.join(0.2)
    assert asker.is_alive() and not got  # waiting for the preload
    release.set()
    loading.join(10)
    asker.join(10)
    assert got == ["kernels"] and calls == ["kblam-few-rows-load"]
    assert few_rows.preload() is None  # loaded: nothing to start


@pytest.mark.parametrize("threads", [1, 2])
def test_a_trained_adapter_loaded_for_one_thread_preloads_the_kernels(tmp_path, hash_encoder, monkeypatch, threads):
    folder = wrap("llama", hash_encoder).save_pretrained(tmp_path / "adapter")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "trained": True}))
    monkeypatch.setattr("kblam.kb_cache.default_state_dtype", lambda device: torch.bfloat16)
    started = []
    monkeypatch.setattr(few_rows, "preload", lambda: started.append(1))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = KBLaM.from_pretrained(folder, base_model=tiny_model("llama"), tokenizer=object(), encoder=hash_encoder)
    finally:
        torch.set_num_threads(saved)
    assert model.kb_cache.dtype == torch.bfloat16
    assert started == ([1] if threads == 1 else [])
