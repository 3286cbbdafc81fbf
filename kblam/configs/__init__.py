"""The architecture configs of the base models the recipes name, stored here so nothing comes from the Hub.

Each file is the model's `config.json` as published (architecture hyper-parameters are public facts;
remote-code entries dropped), named after the Hub id with "/" as "--". The planner reads them at full
size (`kblam train RECIPE --plan`, no weights), and tests and benchmarks build random-weight models
from them with depth and width reduced (`shrink`). A model not stored here is read with transformers'
AutoConfig (a local folder, or the Hub for users who are online).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

FOLDER = Path(__file__).parent
# The embedded default (kblam.defaults) is SmolLM2-135M-Instruct, converted from a GGUF file.
DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"


def stored(name: str) -> Path | None:
    """The stored config file of a Hub id ("default" for the embedded model), or None."""
    path = FOLDER / f"{(DEFAULT if name == 'default' else name).replace('/', '--')}.json"
    return path if path.is_file() else None


def names() -> list[str]:
    """Hub ids of the stored configs."""
    return sorted(p.stem.replace("--", "/") for p in FOLDER.glob("*.json"))


def load_config(name: str):
    """A transformers config for a base model: a stored one if there is one, else AutoConfig's."""
    from transformers import AutoConfig

    path = stored(name)
    if path is None:
        return AutoConfig.from_pretrained(name)
    data = json.loads(path.read_text(encoding="utf-8"))
    hub_id = data.pop("_name_or_path", name)
    data.pop("architectures", None)  # the causal-LM class follows from model_type
    data.pop("torch_dtype", None)  # the caller chooses (from_config would otherwise build bfloat16 on a CPU)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    config.name_or_path = hub_id
    return config


def shrink(config, *, layers: int, hidden: int | None = None, heads: int | None = None,
           kv_heads: int | None = None, head_dim: int | None = None, intermediate: int | None = None,
           vocab: int | None = None):
    """A copy of `config` with fewer layers and, optionally, a smaller width: same family, same code path.

    Grouped-query attention is kept grouped: kv_heads defaults to heads over the original group size.
    """
    small = copy.deepcopy(config)
    small.num_hidden_layers = layers
    if hidden is not None:
        heads = heads or config.num_attention_heads
        group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        small.hidden_size = hidden
        small.num_attention_heads = heads
        kv = kv_heads or max(1, heads // group)
        if kv == 1 and group < config.num_attention_heads and heads % 2 == 0:
            # Keep several key/value heads where the original has several: with one, transformers' repeat
            # of keys and values is a view, not a copy, which changes what a layer keeps for the backward.
            kv = 2
        small.num_key_value_heads = kv
        if getattr(config, "head_dim", None) is not None:
            small.head_dim = head_dim or hidden // heads
        small.intermediate_size = intermediate or hidden * config.intermediate_size // config.hidden_size
    if vocab is not None:
        small.vocab_size = vocab
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(small, key, None)
            if isinstance(value, list):
                setattr(small, key, [v if v < vocab else vocab - 1 for v in value])
            elif value is not None and value >= vocab:
                setattr(small, key, vocab - 1)
    for key in ("max_window_layers",):
        if getattr(small, key, None) is not None:
            setattr(small, key, min(getattr(small, key), layers))
    if getattr(small, "layer_types", None) is not None:
        small.layer_types = small.layer_types[:layers]
    return small
