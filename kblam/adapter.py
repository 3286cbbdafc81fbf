"""The trainable part of KBLaM: KB key/value adapters and the KB query heads, and their config.

KB key of triple j on layer l:   LayerNorm(W_K^l e_key(j))    e_key = encoder("The {property} of {name}")
KB value of triple j on layer l: W_V^l e_value(j)             e_value = encoder("{value}")
Both are sized for the layer's key/value heads. Each KB layer also gets its own query projection:
a copy of that layer's q_proj (the paper), or, with `query_rank`, the frozen q_proj plus a trainable
low-rank delta (peft's LoRA idea, kept outside the base so its text attention stays untouched).

Optional parts, off in the paper-faithful configuration (see train/recipes/ for what earned its place):
- retrieval_prior: the encoder's own question-key cosine, times a learned scale, added to every KB logit.
  It is per triple, so the attention stays linear in the KB, and retrieval works from step 0.
- null_slot: one learned knowledge token per layer that a question with no matching triple can attend to.
- copy_values: a pointer-generator gate (kblam.copying) that lets the decoder copy the tokens of the
  values the KB attention points at; the null slot's "value" is the refusal sentence.
- span_kinds: a gate (kblam.spans) that, at each step, chooses between the LM's next token and quoting a
  whole span of the triple the KB attention points at: its value ("value"), or the whole fact
  ("fact": "the {property} of {name} is {value}"). Replaces the token-level copy mix.
"""

from __future__ import annotations

import errno
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from kblam import adapter_check as ac
from kblam._version import __version__
from kblam.adapter_check import AdapterLoadError
from kblam.confidence import CALIBRATION_NAME, Calibrator
from kblam.kb import KEY_TEMPLATE, VALUE_TEMPLATE
from kblam.spans import KINDS

REFUSAL = "I'm sorry, I cannot find that in the knowledge base."

CONFIG_NAME = "kblam_config.json"
WEIGHTS_NAME = "kblam_adapter.safetensors"


def _check(rule) -> dict:
    """Field metadata: the rule kblam.adapter_check applies to this field when a config is loaded."""
    return {"check": rule}


@dataclass
class KBLaMConfig:
    """Everything needed to rebuild the adapter and to check it meets the right base model and encoder.

    Loading checks every field against its annotation and its `check` rule (kblam.adapter_check):
    a new field needs a type and, if its range matters, a rule; a field with a default is optional,
    so configs written before it existed still load.
    """

    base_model: str = field(metadata=_check(ac.non_empty))
    base_fingerprint: str
    encoder: str = field(metadata=_check(ac.non_empty))
    encoder_dim: int = field(metadata=_check(ac.at_least(1)))
    kb_layers: list[int] = field(metadata=_check(ac.layer_indices))
    hidden_size: int = field(metadata=_check(ac.at_least(1)))
    num_attention_heads: int = field(metadata=_check(ac.at_least(1)))
    num_key_value_heads: int = field(metadata=_check(ac.divides("num_attention_heads")))
    head_dim: int = field(metadata=_check(ac.at_least(1)))
    num_hidden_layers: int = field(metadata=_check(ac.at_least(1)))
    kb_scale_factor: float | None = field(default=100.0, metadata=_check(ac.positive))  # log(C) shifts KB logits
    key_template: str = field(default=KEY_TEMPLATE, metadata=_check(ac.triple_template))
    value_template: str = field(default=VALUE_TEMPLATE, metadata=_check(ac.triple_template))
    trained: bool = False
    query_rank: int | None = field(default=None, metadata=_check(ac.at_least(1)))  # None: full-rank KB query heads copied from q_proj
    retrieval_prior: bool = False
    prior_scale: float = field(default=20.0, metadata=_check(ac.positive))  # initial scale of the prior (learned, kept as its log)
    null_slot: bool = False
    copy_values: bool = False
    max_value_tokens: int = field(default=24, metadata=_check(ac.at_least(1)))  # tokens of a value the copy path can reproduce
    # copied this many tokens of a value: finish it (None: the gate decides)
    copy_commit_after: int | None = field(default=2, metadata=_check(ac.at_least(1)))
    # Span kinds the answer may quote (kblam.spans.KINDS), e.g. ["value", "fact"]; None: no span gate.
    span_kinds: list[str] | None = field(default=None, metadata=_check(ac.distinct_among(KINDS)))
    refusal: str = field(default=REFUSAL, metadata=_check(ac.non_empty))
    system_prompt: str | None = None  # None: the chat template's default
    kblam_version: str = __version__
    extra: dict = field(default_factory=dict)  # training recipe, scores: for the model card

    def save(self, folder: str | Path) -> None:
        Path(folder, CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> KBLaMConfig:
        """Read and check `folder/kblam_config.json`; AdapterLoadError names the file and the field."""
        folder = Path(folder)
        try:  # stat, not exists(): a symbolic-link loop or a permission problem is not "not found"
            folder.stat()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "adapter folder not found", str(folder)) from None
        if not folder.is_dir():
            raise AdapterLoadError(f"is a file; an adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}",
                                   path=folder)
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise AdapterLoadError(f"is missing: {folder} is not a kblam adapter folder", path=path)
        return ac.config_from_dict(cls, ac.read_json_object(path), path)


def load_weights(folder: str | Path, config: KBLaMConfig) -> dict[str, torch.Tensor]:
    """Read `folder/kblam_adapter.safetensors` and check it against `config` (names, shapes, finite
    values) without building the adapter: the expected shapes come from a KBAdapter on the meta device."""
    path = Path(folder, WEIGHTS_NAME)
    if not path.is_file():
        raise AdapterLoadError("is missing: an adapter folder holds its config and these weights", path=path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise AdapterLoadError(f"is not a readable safetensors file ({err})", path=path) from None
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in KBAdapter(config).state_dict().items()}
    except (RuntimeError, ValueError, OverflowError) as err:  # sizes beyond what torch can describe
        raise AdapterLoadError(f"describes an adapter that cannot be built ({err})",
                               path=Path(folder, CONFIG_NAME)) from None
    ac.check_weights(state, expected, path)
    return state


def load_calibration(folder: str | Path) -> Calibrator | None:
    """The folder's calibration.json (kblam.confidence), or None: its field types are checked against
    the Calibrator dataclass first, so that a string where a number belongs is named, not a TypeError."""
    path = Path(folder, CALIBRATION_NAME)
    if not path.is_file():
        return None
    ac.config_from_dict(Calibrator, ac.read_json_object(path), path)
    try:
        return Calibrator.load(folder)  # its own checks: known signals, matching lengths, the threshold
    except ValueError as err:
        raise AdapterLoadError(str(err).removeprefix(f"{path}: "), path=path) from None


def query_projection(attn: nn.Module, q_out: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias that produce an attention module's queries (Phi-3 fuses them into qkv_proj)."""
    if hasattr(attn, "q_proj"):
        return attn.q_proj.weight, attn.q_proj.bias
    if hasattr(attn, "qkv_proj"):
        bias = attn.qkv_proj.bias
        return attn.qkv_proj.weight[:q_out], None if bias is None else bias[:q_out]
    raise TypeError(f"{type(attn).__name__} has neither q_proj nor qkv_proj: kblam cannot find its queries")


def query_module(attn: nn.Module) -> nn.Linear | None:
    """The plain nn.Linear whose output starts with the attention module's queries (q_proj, or Phi-3's
    qkv_proj), or None when that projection is anything else (quantised, wrapped): its output would then
    not be query_projection's product."""
    proj = getattr(attn, "q_proj", None) or getattr(attn, "qkv_proj", None)
    return proj if type(proj) is nn.Linear else None


class LowRankQuery(nn.Module):
    """q = q_proj(h) + up(down(h)): the layer's frozen query projection plus a trainable low-rank delta."""

    def __init__(self, hidden_size: int, q_dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, q_dim, bias=False)
        nn.init.zeros_(self.up.weight)  # starts as q_proj exactly
        self._attn: list[nn.Module] = []  # a list, so the base's weights stay out of the adapter's state dict

    def bind(self, attn: nn.Module) -> None:
        self._attn[:] = [attn]

    def forward(self, hidden: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """`base`: q_proj(hidden) when the caller has it already (the base model computed it)."""
        if base is None:
            if not self._attn:
                raise RuntimeError("LowRankQuery is not bound to its attention module")
            weight, bias = query_projection(self._attn[0], self.up.out_features)
            base = nn.functional.linear(hidden.to(weight.dtype), weight, bias)
        return base.to(hidden.dtype) + self.up(self.down(hidden))


class KBAdapter(nn.Module):
    """Per KB layer: key projection + LayerNorm, value projection, and a KB query head (+ optional parts)."""

    def __init__(self, config: KBLaMConfig):
        super().__init__()
        self.config = config
        kv_dim = config.num_key_value_heads * config.head_dim
        q_dim = config.num_attention_heads * config.head_dim
        layers = [str(i) for i in config.kb_layers]
        self.key_proj = nn.ModuleDict({i: nn.Linear(config.encoder_dim, kv_dim) for i in layers})
        self.key_norm = nn.ModuleDict({i: nn.LayerNorm(kv_dim) for i in layers})
        self.value_proj = nn.ModuleDict({i: nn.Linear(config.encoder_dim, kv_dim) for i in layers})
        if config.query_rank:
            self.query_heads = nn.ModuleDict(
                {i: LowRankQuery(config.hidden_size, q_dim, config.query_rank) for i in layers}
            )
        else:
            self.query_heads = nn.ModuleDict({i: nn.Linear(config.hidden_size, q_dim) for i in layers})
        if config.retrieval_prior:
            self.log_prior_scale = nn.Parameter(torch.tensor(math.log(config.prior_scale)))
        if config.null_slot:
            self.null_key = nn.Parameter(torch.randn(len(layers), kv_dim) * 0.02)
            self.null_value = nn.Parameter(torch.zeros(len(layers), kv_dim))
            self.null_bias = nn.Parameter(torch.zeros(len(layers)))
        if config.copy_values:
            # Gate input: the final hidden state, the KB mass on copies in progress, and on the null slot.
            self.copy_gate = nn.Linear(config.hidden_size + 2, 1)
            nn.init.zeros_(self.copy_gate.weight)
            nn.init.constant_(self.copy_gate.bias, -3.0)
        if config.span_kinds:
            # Gate input: the final hidden state, the KB mass on the null slot and on quoted triples.
            # Output: logits of (the LM's token, a span of each kind).
            self.span_gate = nn.Linear(config.hidden_size + 2, 1 + len(config.span_kinds))
            nn.init.zeros_(self.span_gate.weight)
            with torch.no_grad():
                self.span_gate.bias.copy_(torch.tensor([3.0] + [0.0] * len(config.span_kinds)))

    @property
    def prior_scale(self) -> torch.Tensor:
        return self.log_prior_scale.exp()

    def bind(self, attention_modules: dict[int, nn.Module]) -> None:
        """Low-rank query heads read their layer's q_proj at call time."""
        if self.config.query_rank:
            for layer in self.config.kb_layers:
                self.query_heads[str(layer)].bind(attention_modules[layer])

    @torch.no_grad()
    def init_query_heads(self, attention_modules: dict[int, nn.Module]) -> None:
        """Start each KB query head as its layer's query projection."""
        if self.config.query_rank:
            return  # a low-rank head starts as q_proj by construction
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
        states = {}
        for n, layer in enumerate(self.config.kb_layers):
            keys, values = self.layer_states(n, key_embeddings, value_embeddings)
            if self.config.null_slot:  # the null slot is the last knowledge token of every KB
                null_k, null_v = self.null_states(n, keys.shape[0], keys.dtype)
                keys, values = torch.cat([keys, null_k], dim=2), torch.cat([values, null_v], dim=2)
            states[layer] = (keys, values)
        return states

    def layer_states(self, n: int, key_embeddings: torch.Tensor, value_embeddings: torch.Tensor):
        """The n-th KB layer's (keys, values), each (B, kv_heads, M, head_dim), for (B, M, d) embeddings:
        no null slot (kb_states adds it; kblam.kb_cache.project writes it once per KB)."""
        i = str(self.config.kb_layers[n])
        b, m, _ = key_embeddings.shape
        shape = (b, m, self.config.num_key_value_heads, self.config.head_dim)
        keys = self.key_norm[i](self.key_proj[i](key_embeddings)).view(shape).transpose(1, 2)
        values = self.value_proj[i](value_embeddings).view(shape).transpose(1, 2)
        return keys, values

    def null_states(self, n: int, batch: int, dtype: torch.dtype):
        """The n-th KB layer's null slot (key, value), each (batch, kv_heads, 1, head_dim)."""
        shape = (batch, self.config.num_key_value_heads, 1, self.config.head_dim)
        return tuple(p[n].view(1, -1, 1, self.config.head_dim).expand(shape).to(dtype)
                     for p in (self.null_key, self.null_value))
