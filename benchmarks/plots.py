"""Figures for docs/benchmarks.md, from benchmarks/results/{quality,cost}.json (matplotlib, Agg).

    .venv/bin/python benchmarks/plots.py [--results benchmarks/results] [--out docs/img]

Writes quality_vs_size.png (synthetic held-out KBs, one line per method), quality_real.png (real and
counterfactual country facts), cost_vs_size.png (time to first token, peak memory and decoding speed
against KB size, log x) and attention_heatmap.png (kblam's KB attention of 8 questions over 16 triples).
A figure whose results file is missing is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STYLE = {  # colour, marker
    "kblam": ("#d62728", "o"),
    "kblam-prefilter": ("#ff7f0e", "v"),
    "icl": ("#1f77b4", "s"),
    "rag": ("#2ca02c", "^"),
    "zero-shot": ("#7f7f7f", "D"),
}
LABEL = {"kblam": "kblam", "kblam-prefilter": "kblam + FAISS pre-filter", "icl": "in-context (ICL)", "rag": "RAG (FAISS, top-5)", "zero-shot": "zero-shot"}


def _methods(rows):
    return [m for m in STYLE if any(r["method"] == m for r in rows)]


def _mark_failures(ax, rows, method, y_top):
    colour, _ = STYLE[method]
    failed = [r for r in rows if r["method"] == method and r["status"] != "ok"]
    if failed:
        first = min(failed, key=lambda r: r["size"])
        ax.scatter([first["size"]], [y_top], marker="x", color=colour, s=60, zorder=5, clip_on=False)
        ax.annotate(first["status"].split(" (")[0], (first["size"], y_top), textcoords="offset points",
                    xytext=(-6, -10), fontsize=7, color=colour, ha="right")


def quality_vs_size(quality: dict, out: Path) -> Path:
    rows = [r for r in quality["results"] if r["dataset"] == "synthetic"]
    metrics = [("contains", "answer contains gold value"), ("rouge_l", "ROUGE-L F1 vs reference"),
               ("top1", "top-1 retrieval"), ("refusal_recall", "refusal recall (unanswerable)")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (metric, title) in zip(axes.flat, metrics, strict=True):
        for method in _methods(rows):
            if metric == "top1" and method in ("icl", "zero-shot"):
                continue  # they retrieve nothing
            ok = sorted((r for r in rows if r["method"] == method and r["status"] == "ok"
                         and r.get(metric) is not None), key=lambda r: r["size"])
            colour, marker = STYLE[method]
            if ok:
                ax.plot([r["size"] for r in ok], [r[metric] for r in ok], marker=marker, color=colour,
                        label=LABEL[method])
            _mark_failures(ax, rows, method, 1.02)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("KB size (triples)")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Held-out synthetic KBs: quality against KB size (x: ICL exceeds the context window)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def quality_real(quality: dict, out: Path) -> Path | None:
    rows = {(r["dataset"], r["method"]): r for r in quality["results"] if r["dataset"] != "synthetic"}
    if not rows:
        return None
    methods = [m for m in STYLE if any(k[1] == m for k in rows)]
    bars = [("real", "contains", "real: contains value"),
            ("counterfactual", "contains", "counterfactual: contains KB value"),
            ("counterfactual", "contains_original", "counterfactual: contains true value")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(bars)
    shades = ("#4c72b0", "#dd8452", "#937860")
    for b, (dataset, metric, label) in enumerate(bars):
        xs, ys = [], []
        for i, method in enumerate(methods):
            r = rows.get((dataset, method))
            if r is None:
                continue
            x = i + (b - (len(bars) - 1) / 2) * width
            if r["status"] != "ok":
                ax.text(x, 0.02, r["status"].split(" (")[0], rotation=90, fontsize=7, ha="center", va="bottom")
                continue
            xs.append(x)
            ys.append(r.get(metric) or 0.0)
        ax.bar(xs, ys, width=width, color=shades[b], label=label)
        for x, y in zip(xs, ys, strict=True):
            ax.text(x, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(methods)), [LABEL[m] for m in methods])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of answerable questions")
    size = next(iter(rows.values()))["size"]
    ax.set_title(f"Real ISO country/currency facts ({size} triples) and a counterfactual copy")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def cost_vs_size(cost: dict, out: Path) -> Path:
    runs = cost["runs"]
    panels = [("ttft_s", "time to first token (s)", True),
              ("peak_after_load_mb", "peak resident memory after loading (MB)", False),
              ("tokens_per_s", "decoding speed (tokens/s)", False)]
    for r in runs:  # older results: the whole run's peak only
        if r.get("status") == "ok" and "peak_after_load_mb" not in r and "peak_rss_mb" in r:
            r["peak_after_load_mb"] = r["peak_rss_mb"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    sized = [r["size"] for r in runs if r["size"]]
    lo, hi = (min(sized), max(sized)) if sized else (10, 100000)
    for ax, (metric, title, logy) in zip(axes, panels, strict=True):
        for method in _methods(runs):
            colour, marker = STYLE[method]
            ok = sorted((r for r in runs if r["method"] == method and r["status"] == "ok"
                         and r.get(metric) is not None), key=lambda r: r["size"])
            if method == "zero-shot":
                if ok:
                    ax.axhline(ok[0][metric], color=colour, ls="--", label=f"{LABEL[method]} (no KB)")
                continue
            if ok:
                ax.plot([r["size"] for r in ok], [r[metric] for r in ok], marker=marker, color=colour,
                        label=LABEL[method])
            failed = [r for r in runs if r["method"] == method and r["status"] != "ok" and r["size"]]
            if failed and ok:
                first = min(failed, key=lambda r: r["size"])
                ax.scatter([first["size"]], [ok[-1][metric]], marker="x", color=colour, s=60, zorder=5)
                ax.annotate(first["status"], (first["size"], ok[-1][metric]), textcoords="offset points",
                            xytext=(-4, 6), fontsize=7, color=colour, ha="right")
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.5, hi * 1.5)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("KB size (triples)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    threads = cost["meta"]["machine"].get("torch_threads")
    fig.suptitle(f"Cost against KB size (CPU, float32, {threads} torch thread{'' if threads == 1 else 's'}; one question, "
                 f"{cost['meta']['settings']['new_tokens']} new tokens)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def attention_heatmap(quality: dict, out: Path) -> Path | None:
    att = quality.get("attention_map")
    if not att:
        return None
    import numpy as np

    scores = np.array(att["scores"])
    fig, ax = plt.subplots(figsize=(12, 5.5))
    im = ax.imshow(scores, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(att["triples"])),
                  [t if len(t) < 42 else t[:40] + "…" for t in att["triples"]], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(att["questions"])),
                  [q if len(q) < 70 else q[:68] + "…" for q in att["questions"]], fontsize=7)
    for row, col in enumerate(att["asked"]):
        ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    fig.colorbar(im, ax=ax, label="share of KB attention")
    ax.set_title("kblam: KB attention of each question over the triples (red: the triple asked about)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    quality_file, cost_file = args.results / "quality.json", args.results / "cost.json"
    if quality_file.is_file():
        quality = json.loads(quality_file.read_text())
        written.append(quality_vs_size(quality, args.out / "quality_vs_size.png"))
        written.append(quality_real(quality, args.out / "quality_real.png"))
        written.append(attention_heatmap(quality, args.out / "attention_heatmap.png"))
    else:
        print(f"no {quality_file}: quality figures skipped", file=sys.stderr)
    if cost_file.is_file():
        written.append(cost_vs_size(json.loads(cost_file.read_text()), args.out / "cost_vs_size.png"))
    else:
        print(f"no {cost_file}: cost figure skipped", file=sys.stderr)
    written = [w for w in written if w is not None]
    for w in written:
        print(f"wrote {w}")
    return written


if __name__ == "__main__":
    main()
