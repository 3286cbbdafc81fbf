"""Why a decoding step's KB products run below the memory's rate: the products of one question's query
rows by one KB layer's bfloat16 states, the states coming from memory (cold) or from the cache (warm).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kb_products.py [--triples 10000]

The shapes are the default model's: 3 KV heads of 64 dimensions, 3 query heads per KV head (one
question, one token). Each figure is the median of --repeats calls, each after a pass over a 256 MB
tensor that pushes the KB out of the caches (cold), or right after the previous call (warm). Rows:
the scores (queries x keys, as kblam.attention multiplies a whole KB), the mix (probabilities x
values, the values in the usual (token, dim) layout, as kblam keeps them, and stored knowledge token
innermost, as kblam kept them before torch's fused attention served prompts; also for a 24-token
prompt's 72 rows), a plain read of the keys (the memory's rate for the same bytes), the scores after reading the
keys first (warming the cache on purpose) and the scores and mix with the states prepacked for oneDNN
(the layout torch's inductor uses for frozen weights; kblam keeps the plain one, which chunks and edits
slice). Then other ways to the same scores, from memory: keys x queries, float32 states, a product
per chunk of 2,048 knowledge tokens, the KV heads as one block-diagonal product, a product per query
row, and torch's fused attention over the KB part; and a 24-token prompt's KB part through that fused kernel
as kblam calls it (4,096 knowledge tokens a call) and in one call over the whole KB, through kblam's loop for
CPUs without AMX (oneDNN's products and kblam's softmax kernel, on one thread and in halves on two), and
through the chunked loop that this loop replaced. Last, kblam.few_rows' kernel (numba, the `fast`
extra), which kblam uses for such products on one thread: the scores and the mix from float32 rows, cold
(the mix in both layouts: sums along the rows, or along each row), and the scores for 4, 7 and 12 rows a
KV head beside torch's; and a one-question step's whole KB attention in one call (few_rows.attend) on one
thread and on two (its halves, at any size: kblam splits from MOST_TOKENS_ALONE knowledge tokens).
Prints one JSON object of milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    heads, group, dim, m = 3, 3, 64, args.triples
    keys = torch.randn(heads, m, dim).bfloat16()
    values = torch.randn(heads, m, dim).bfloat16()  # as kblam keeps them: (token, dim)
    # knowledge tokens innermost, each head's block stored transposed: kept from issue 10's fifth round to its
    # tenth (faster for oneDNN's mix; torch's fused attention misreads it)
    values_tokens_innermost = values.transpose(-1, -2).contiguous().transpose(-1, -2)
    queries = torch.randn(heads, group, dim).bfloat16()
    probs = torch.rand(heads, group, m).bfloat16()
    prompt_probs = torch.rand(heads, 72, m).bfloat16()  # a 24-token prompt's rows
    bias = (torch.randn(1, 1, 1, m) - 9.0).bfloat16()
    flush = torch.zeros(64 << 20)

    keys_t = keys.transpose(-1, -2)
    keys_f32, queries_t = keys.float(), queries.transpose(-1, -2)
    by_token = keys.transpose(0, 1).reshape(m, heads * dim).contiguous()  # (M, KV heads x dim)
    block = torch.zeros(heads * dim, heads * group, dtype=torch.bfloat16)  # the queries, block-diagonal
    for h in range(heads):
        block[h * dim:(h + 1) * dim, h * group:(h + 1) * group] = queries[h].T

    def by_chunk(size: int = 2048):
        for h in range(heads):
            for start in range(0, m, size):
                torch.mm(queries[h], keys_t[h, :, start:start + size])

    # name: (product, cold). The first six are kblam's products and the memory's rate; the rest are other
    # ways to the same result, none of which kblam uses: each was tried for issue 10.
    runs = {
        "scores_cold": (lambda: torch.bmm(queries, keys_t), True),
        "scores_warm": (lambda: torch.bmm(queries, keys_t), False),
        "mix_cold": (lambda: torch.bmm(probs, values), True),
        "mix_warm": (lambda: torch.bmm(probs, values), False),
        "mix_values_tokens_innermost_cold": (lambda: torch.bmm(probs, values_tokens_innermost), True),
        "mix_72_rows_cold": (lambda: torch.bmm(prompt_probs, values), True),
        "mix_72_rows_values_tokens_innermost_cold": (lambda: torch.bmm(prompt_probs, values_tokens_innermost),
                                                     True),
        "read_keys_cold": (lambda: keys.sum(), True),
        "read_then_scores_cold": (lambda: (keys.sum(), torch.bmm(queries, keys_t)), True),
        "keys_left_scores_cold": (lambda: torch.bmm(keys, queries_t), True),  # keys x queries
        "float32_scores_cold": (lambda: torch.bmm(queries.float(), keys_f32.transpose(-1, -2)), True),
        "chunked_2048_scores_cold": (by_chunk, True),
        "block_diagonal_scores_cold": (lambda: torch.mm(by_token, block), True),  # all KV heads in one product
        "per_row_scores_cold": (lambda: [torch.mv(keys[h], queries[h, g]) for h in range(heads)
                                         for g in range(group)], True),
        # torch's fused attention (its CPU flash kernel) over the KB part alone: scores, softmax and mix
        "sdpa_kb_part_cold": (lambda: torch.nn.functional.scaled_dot_product_attention(
            queries.reshape(1, heads * group, 1, dim), keys[None], values[None], attn_mask=bias, scale=1.0,
            enable_gqa=True), True),
    }
    # A 24-token prompt's KB part through torch's fused kernel, as kblam.attention calls it (FUSED_CHUNK
    # knowledge tokens a call, joined by their log-sum-exps) and in one call over the whole KB.
    from kblam import attention

    prompt_rows = (torch.randn(1, heads, 72, dim) / 8).bfloat16()
    prompt_bias = bias.float()
    runs["fused_prompt_chunks_cold"] = (lambda: attention._flash_kb(prompt_rows, keys[None], values[None],
                                                                    prompt_bias), True)
    runs["fused_prompt_one_call_cold"] = (lambda: attention._FLASH(prompt_rows, keys[None], values[None], 0.0, False,
                                                                   attn_mask=prompt_bias, scale=1.0), True)
    # The same prompt where the CPU lacks AMX (kblam.attention._looped_kb: oneDNN's products with kblam's softmax
    # kernel between them, on one thread and in halves on two), and the chunked loop it replaced (its KB layer
    # call, a 24-token text part included).
    from kblam import few_rows

    if few_rows_ready := few_rows.softmax_ready():
        for name, halves in (("looped_prompt_cold", False), ("looped_prompt_halves_cold", True)):
            runs[name] = (lambda halves=halves: attention._looped_kb(prompt_rows, keys[None], values[None],
                                                                     prompt_bias, halves=halves), True)
    module = torch.nn.Module().eval()
    text = [torch.randn(1, h, 24, dim) for h in (heads * group, heads, heads)]
    loop_inputs = attention.KBLayerInputs(hidden_states=None, query_head=None, keys=keys[None], values=values[None],
                                          bias=prompt_bias, chunk_size=4096)
    prompt_q = prompt_rows.float().reshape(1, heads * group, 24, dim)
    runs["chunked_loop_prompt_cold"] = (lambda: attention._chunked_attention(
        module, prompt_q, *text, None, 0.125, 0.0, loop_inputs), True)
    out: dict = {"triples": m, "state_mb": round(2 * keys.numel() * keys.element_size() / 1e6, 2)}
    if not few_rows_ready:
        out["looped_prompt_cold"] = "unavailable: numba is not installed, or torch runs more than one thread"
    try:
        linear = torch.ops.mkldnn._linear_pointwise
        packed = [torch.ops.mkldnn._reorder_linear_weight(keys[h].contiguous(), group) for h in range(heads)]
        packed_v = [torch.ops.mkldnn._reorder_linear_weight(values[h].T.contiguous(), group) for h in range(heads)]
        runs["prepacked_scores_cold"] = (lambda: [linear(queries[h], packed[h], None, "none", [], "")
                                                  for h in range(heads)], True)
        runs["prepacked_mix_cold"] = (lambda: [linear(probs[h], packed_v[h], None, "none", [], "")
                                               for h in range(heads)], True)
    except (AttributeError, RuntimeError) as error:  # a torch build without oneDNN's linear ops
        out["prepacked_scores_cold"] = out["prepacked_mix_cold"] = f"unavailable: {error}"

    if few_rows._load():
        rows_f32, probs_f32 = queries.float(), probs.float()
        runs["few_rows_scores_cold"] = (lambda: few_rows.product(rows_f32, keys_t), True)
        runs["few_rows_mix_cold"] = (lambda: few_rows.product(probs_f32, values), True)
        runs["few_rows_mix_tokens_innermost_cold"] = (lambda: few_rows.product(probs_f32, values_tokens_innermost),
                                                      True)
        # A one-question step's whole KB attention in one call (few_rows.attend: the scores, the joint softmax
        # with 40 text tokens, both mixes), on one thread and with the KB split between two (halves, where a
        # core is free): the threshold MOST_TOKENS_ALONE comes from these rows at several --triples.
        text_keys, text_values = torch.randn(heads, 40, dim), torch.randn(heads, 40, dim)
        if few_rows._halves_ready():
            for name, halves in (("few_rows_attend_cold", False), ("few_rows_attend_halves_cold", True)):
                runs[name] = (lambda halves=halves: few_rows._attend_now(
                    rows_f32 / 8, rows_f32 / 8, keys, values, 0.0, text_keys, text_values, False, halves), True)
        else:
            out["few_rows_attend_halves_cold"] = "unavailable: numba's threads do not start quickly here"
        # More rows a KV head (another model's group, a batch's questions): where torch catches up.
        for count in (4, 7, 12):
            more = torch.randn(heads, count, dim)
            runs[f"scores_{count}_rows_cold"] = (lambda more=more: torch.bmm(more.bfloat16(), keys_t), True)
            runs[f"few_rows_scores_{count}_rows_cold"] = (lambda more=more: few_rows.product(more, keys_t), True)
    else:
        out["few_rows_scores_cold"] = out["few_rows_mix_cold"] = "unavailable: numba is not installed"

    # Every product once per round, in turn, so that the machine's drifts weigh on all of them alike.
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn, _ in runs.values():
        fn()
    for _ in range(args.repeats):
        for name, (fn, cold) in runs.items():
            if cold:
                flush.add_(1)
            elif name.endswith("_warm"):
                fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    out.update({name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
