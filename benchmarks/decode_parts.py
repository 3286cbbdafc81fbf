"""What each of issue 10's decoding changes saves: a decoding pass over 10,000 triples with and without each.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_parts.py [--rounds 40]

One question's prompt is read once with the KB attached; then one forward pass of one token at a time
from its cache, the variants taking turns pass by pass, --rounds passes each (the median, in
milliseconds). Whole decodings per variant, as speed.py times its goal, were too coarse here: a
neighbour's load on this shared machine slows a decoding or two at a time, by more than the
differences measured. Taking turns pass by pass (each round starting one variant further on), a slow
second weighs on every variant alike. The cache grows by one token a pass, for all of them.

- kb: kblam as it is (with a core free, the products over two threads: kblam.few_rows' halves);
- kb_one_thread: the products on one thread (`model.second_thread = False`);
- kb_torch_products: the KB's products by torch.bmm instead of kblam.few_rows' kernel (one thread), and
  the general path below;
- kb_general_step: the kernel's products, but rectangular_attention's general path instead of its
  one-question step (kblam.attention._one_question_step: the logits side by side in one buffer, the bias
  added by the kernel);
- kb_q_proj_again: the low-rank KB query heads multiply by q_proj again instead of taking the base's
  q_proj output (kblam.model's q_proj catch off);
- kb_values_by_dim: the KB values laid out (dim, token), knowledge tokens innermost (the layout
  kblam.kb_cache kept until torch's fused attention served prompts: that kernel misreads it), mixed by
  the kernel's sums along each row, instead of the usual (token, dim) layout and its sums along the rows;
- kb_keys_by_token: the keys stored transposed as well (a layout tried and not kept);
- kb_10_triples: a KB of 10 triples (a KB's fixed cost, whatever its size);
- no_kb: the base model alone.

Needs benchmarks/scale.py's MiniLM-encoded store of 10,000 triples under the kblam cache (bench-scale),
which speed.py builds too. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--triples", type=int, default=10_000)
    args = parser.parse_args()

    import torch
    from speed import _load, _questions, _real_kb

    from kblam import attention, few_rows
    from kblam.adapter import LowRankQuery
    from kblam.defaults import cache_dir
    from kblam.encoder import KBEmbeddings

    torch.set_num_threads(1)
    model = _load(None)
    kb = _real_kb(args.triples, cache_dir() / "bench-scale")
    small = KBEmbeddings(kb.triples[:10], kb.keys[:10], kb.values[:10])
    question = _questions(kb, 1, offset=11)[0]
    with torch.no_grad():
        states, small_states = model.kb_states(kb), model.kb_states(small)
        kept = dict(model.kb_layers(states))
        model.kb_layers(small_states)
    layouts = {
        "kept": kept,
        "values_by_dim": {layer: (k, v.transpose(-1, -2).contiguous().transpose(-1, -2))
                          for layer, (k, v) in kept.items()},
        "keys_by_token": {layer: (k.transpose(-1, -2).contiguous().transpose(-1, -2), v)
                          for layer, (k, v) in kept.items()},
    }
    catching = LowRankQuery.forward
    one_step = attention._is_one_question_step

    def never(*args):
        return False

    def again(self, hidden, base=None):  # the q_proj catch ignored: q_proj multiplied again
        return catching(self, hidden)

    # name: (KB states or None, their layers' layout, the query heads' forward)
    variants = {
        "kb": (states, "kept", catching),
        "kb_one_thread": (states, "kept", catching),
        "kb_torch_products": (states, "kept", catching),
        "kb_general_step": (states, "kept", catching),
        "kb_q_proj_again": (states, "kept", again),
        "kb_values_by_dim": (states, "values_by_dim", catching),
        "kb_keys_by_token": (states, "keys_by_token", catching),
        "kb_10_triples": (small_states, "kept", catching),
        "no_kb": (None, "kept", catching),
    }
    inputs = model.tokenizer([model.format_prompt(question)], return_tensors="pt", add_special_tokens=False)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        with model.attach(states, questions=[question]):
            out = model.base(**inputs, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        mask = inputs["attention_mask"]
        names = list(variants)
        second = model.second_thread  # as loaded; kb_one_thread turns it off for its passes
        for round_ in range(args.rounds):
            # Each round starts one variant further on: none always follows the same one (whose states the
            # caches may still hold).
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                kb_states, layout, forward = variants[name]
                if kb_states is states:
                    states.layers = layouts[layout]
                LowRankQuery.forward = forward
                few_rows.ENABLED = name != "kb_torch_products"
                model.second_thread = False if name == "kb_one_thread" else second
                attention._is_one_question_step = never if name in ("kb_torch_products", "kb_general_step") else one_step
                mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
                attached = model.attach(kb_states, questions=[question]) if kb_states is not None \
                    else contextlib.nullcontext()
                try:
                    with attached:  # attaching (the question's encoder call, cached) is not timed
                        start = time.perf_counter()
                        out = model.base(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
                        times[name].append(time.perf_counter() - start)
                finally:
                    states.layers, LowRankQuery.forward, few_rows.ENABLED = kept, catching, True
                    model.second_thread = second
                    attention._is_one_question_step = one_step
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    out = {"triples": args.triples, "rounds": args.rounds, "state_dtype": str(model.kb_cache.dtype).removeprefix("torch."),
           "pass_ms": {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}}
    no_kb = out["pass_ms"]["no_kb"]
    out["over_no_kb_ms"] = {name: round(ms - no_kb, 2) for name, ms in out["pass_ms"].items()}
    out["speed_vs_no_kb"] = {name: round(no_kb / ms, 3) for name, ms in out["pass_ms"].items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
