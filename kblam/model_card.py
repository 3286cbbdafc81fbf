"""The README model card written beside every saved adapter."""

from __future__ import annotations

from pathlib import Path

from kblam.adapter import KBLaMConfig


def write_model_card(folder: str | Path, config: KBLaMConfig, body: str | None = None,
                     load_path: str | None = None) -> Path:
    """Write README.md: what the adapter is for, how to load it, and `body` (training and scores)."""
    status = "trained" if config.trained else "UNTRAINED: the knowledge base cannot inform answers yet"
    layers = ", ".join(str(i) for i in config.kb_layers)
    text = f"""---
library_name: kblam
base_model: {config.base_model}
tags: [kblam, knowledge-base, adapter]
---

# kblam adapter for {config.base_model}

Status: **{status}**.

| | |
|---|---|
| base model | `{config.base_model}` (weights fingerprint `{config.base_fingerprint}`) |
| sentence encoder | `{config.encoder}` ({config.encoder_dim}-d) |
| KB layers | {layers} of {config.num_hidden_layers} |
| kb_scale_factor | {config.kb_scale_factor} |
| key / value text | `{config.key_template}` / `{config.value_template}` |
| kblam version | {config.kblam_version} |

```python
from kblam import KBLaM, KnowledgeBase
model = KBLaM.from_pretrained({'' if load_path == '' else repr(load_path or Path(folder).name)})
print(model.ask("...", kb=KnowledgeBase.from_csv("facts.csv")).text)
```

{body or "No training record was given for this adapter."}
"""
    path = Path(folder, "README.md")
    path.write_text(text, encoding="utf-8")
    return path
