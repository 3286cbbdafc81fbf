"""The trainable part of KBLaM: KB key/value adapters and the KB query heads, and their config.

KB key of triple j on layer l:   LayerNorm(W_K^l e_key(j))    e_key = encoder("The {property} of {name}")
KB value of triple j on layer l: W_V^l e_value(j)             e_value = encoder("{value}")
Both are sized for the layer's key/value heads. Each KB layer also gets its own query projection,
initialised from that layer's q_proj, so the KB query can learn without touching the base model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from kblam._version import __version__
from kblam.kb import KEY_TEMPLATE, VALUE_TEMPLATE

CONFIG_NAME = "kblam_config.json"
WEIGHTS_NAME = "kblam_adapter.safetensors"


@dataclass
class KBLaMConfig:
    """Everything needed to rebuild the adapter and to check it meets the right base model and encoder."""

    base_model: str
    base_fingerprint: str
    encoder: str
    encoder_dim: int
    kb_layers: list[int]
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    kb_scale_factor: float | None = 100.0
    key_template: str = KEY_TEMPLATE
    value_template: str = VALUE_TEMPLATE
    trained: bool = False
    kblam_version: str = __version__
    extra: dict = field(default_factory=dict)  # training recipe, scores: for the model card

    def save(self, folder: str | Path) -> None:
        Path(folder, CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> KBLaMConfig:
        path = Path(folder, CONFIG_NAME)
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a kblam adapter folder: {CONFIG_NAME} is missing")
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config fields {unknown} (written by a newer kblam?)")
        return cls(**data)


def query_projection(attn: nn.Module, q_out: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias that produce an attention module's queries (Phi-3 fuses them into qkv_proj)."""
    if hasattr(attn, "q_proj"):
        return attn.q_proj.weight, attn.q_proj.bias
    if hasattr(attn, "qkv_proj"):
        bias = attn.qkv_proj.bias
        return attn.qkv_proj.weight[:q_out], None if bias is None else bias[:q_out]
    raise TypeError(f"{type(attn).__name__} has neither q_proj nor qkv_proj: kblam cannot find its queries")


class KBAdapter(nn.Module):
    """Per KB layer: key projection + LayerNorm, value projection, and a KB query head."""

    def __init__(self, config: KBLaMConfig):
        super().__init__()
        self.config = config
        kv_dim = config.num_key_value_heads * config.head_dim
        q_dim = config.num_attention_heads * config.head_dim
        layers = [str(i) for i in config.kb_layers]
        self.key_proj = nn.ModuleDict({i: nn.Linear(config.encoder_dim, kv_dim) for i in layers})
        self.key_norm = nn.ModuleDict({i: nn.LayerNorm(kv_dim) for i in layers})
        self.value_proj = nn.ModuleDict({i: nn.Linear(config.encoder_dim, kv_dim) for i in layers})
        self.query_heads = nn.ModuleDict({i: nn.Linear(config.hidden_size, q_dim) for i in layers})

    @torch.no_grad()
    def init_query_heads(self, attention_modules: dict[int, nn.Module]) -> None:
        """Start each KB query head as a copy of its layer's query projection."""
        for layer in self.config.kb_layers:
            head = self.query_heads[str(layer)]
            weight, bias = query_projection(attention_modules[layer], head.out_features)
            head.weight.copy_(weight)
            if bias is None:
                head.bias.zero_()
            else:
                head.bias.copy_(bias)

    def kb_states(
        self, key_embeddings: torch.Tensor, value_embeddings: torch.Tensor
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Encoder embeddings (M, d) or (B, M, d) -> {layer: (keys, values)}, each (B|1, kv_heads, M, head_dim)."""
        if key_embeddings.shape != value_embeddings.shape:
            raise ValueError(f"key and value embeddings differ in shape: {key_embeddings.shape} vs {value_embeddings.shape}")
        if key_embeddings.shape[-1] != self.config.encoder_dim:
            raise ValueError(
                f"KB embeddings have dimension {key_embeddings.shape[-1]}, the adapter expects "
                f"{self.config.encoder_dim} (encoder {self.config.encoder})"
            )
        if key_embeddings.dim() == 2:
            key_embeddings, value_embeddings = key_embeddings[None], value_embeddings[None]
        b, m, _ = key_embeddings.shape
        shape = (b, m, self.config.num_key_value_heads, self.config.head_dim)
        states = {}
        for layer in self.config.kb_layers:
            i = str(layer)
            keys = self.key_norm[i](self.key_proj[i](key_embeddings)).view(shape).transpose(1, 2)
            values = self.value_proj[i](value_embeddings).view(shape).transpose(1, 2)
            states[layer] = (keys, values)
        return states
