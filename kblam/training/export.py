"""Export a trained run as an adapter folder: config, bfloat16 weights, model card and loss curve."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch


def read_log(run: str | Path) -> list[dict]:
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(log: list[dict], path: str | Path, title: str = "training loss") -> Path | None:
    """A PNG of the loss (and its parts) against the step, smoothed over 25 steps."""
    if not log:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in ("loss", "answer_loss", "retrieval_loss"):
        points = [(r["step"], r[key]) for r in log if key in r]
        if not points or (key == "answer_loss" and all(r.get("loss") == r.get("answer_loss") for r in log)):
            continue
        steps, values = zip(*points, strict=True)
        window = 25
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (25-step mean)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def export_adapter(model, cfg, folder: str | Path, *, card: str | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save the run's adapter as a trained adapter folder (bfloat16 by default: half the size)."""
    log = read_log(cfg.out)
    model.config.trained = True
    model.config.extra = {
        **model.config.extra,
        "recipe": asdict(cfg),
        "steps": log[-1]["step"] if log else 0,
        "train_seconds": round(sum(r.get("seconds", 0.0) for r in log), 1),
    }
    folder = model.save_pretrained(folder, dtype=dtype, card=card)
    plot_loss(log, folder / "loss.png")
    return folder
