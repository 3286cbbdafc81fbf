"""KBLaM: a frozen Hugging Face causal LM that reads a knowledge base through a trained adapter.

Large knowledge bases (issue 5, docs/scale.md):
- `kb_chunk_size` (default 8192): a KB of more knowledge tokens than this is read in chunks of this
  many by the rectangular attention (kblam.attention), so a layer's attention memory is bounded by
  the chunk, not by the KB. The result equals the single pass. In that mode the copy path's tap keeps
  the KB attention of the last position only (all that generation reads). Inference calls (no
  autograd) size their chunks to their query rows instead (adaptive_chunk, issue 10): the same
  memory bound, a chunk's logits kept within the CPU's caches; 0 or None still turns chunking off.
- `prefilter_above` (default 20,000 triples) and `prefilter_k` (256): above that size `ask` first
  picks each question's top-k triples by key cosine with FAISS (kblam.prefilter) and reads only those.
- `ask` and `attach` take a KBStore as well; with the pre-filter, only the candidates' rows are read
  from the store's memory-mapped float16 embeddings.
- `second_thread` (default None: when torch's threads leave a core free): `ask` prepares a question's KB
  on a second thread while the prompt's first layers run, reduces the sources' KB attention there, and
  splits a large KB's decoding steps between two threads (kblam.second_thread, kblam.few_rows, issue 10).
  True or False decides it.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kblam import attention, copying, few_rows, kb_cache, second_thread
from kblam.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    KBAdapter,
    KBLaMConfig,
    load_calibration,
    load_weights,
    query_module,
)
from kblam.answer import Answer, AnswerStream
from kblam.confidence import Calibrator
from kblam.encoder import KBEmbeddings, KBEncoder
from kblam.kb import KnowledgeBase, Triple
from kblam.kb_cache import KBStateCache, KBStates, key_norms, project
from kblam.model_card import write_model_card
from kblam.prefilter import KBPrefilter
from kblam.store import KBStore, load_kb

SHIPPED_ADAPTER = Path(__file__).parent / "adapters" / "smollm2-135m-instruct"


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of a strided sample of every weight, rounded to bfloat16.

    Rounding makes a float32 and a bfloat16 load of the same checkpoint agree; the stride keeps it
    to milliseconds on a 7B model.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: self-attention module} for any decoder whose attention follows transformers' layout."""
    found = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "layer_idx"):
            found[module.layer_idx] = module
    if not found:
        raise TypeError(f"{type(model).__name__}: no '*.self_attn' modules with a layer_idx; kblam cannot wrap it")
    return dict(sorted(found.items()))


class KBAttentionRecorder:
    """Keeps the KB attention on the triples of the first call on each KB layer (the prompt's prefill).

    It is aggregated as it arrives (chunk by chunk for a chunked KB): per layer only (B, M), the
    head-mean attention summed over the prompt tokens of `token_mask` (B, N), or over all of them.
    """

    def __init__(self, token_mask: torch.Tensor | None = None):
        self.token_mask = token_mask
        self.per_layer: dict[int, torch.Tensor] = {}  # layer -> (B, M'), the null slot's column last
        self.kb_size: int | None = None  # M: the triples' columns (set when attached)

    def wants(self, layer: int) -> bool:
        return layer not in self.per_layer

    def token_sum(self, head_mean: torch.Tensor, rows: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
        """(B, N, chunk) head-mean attention -> (B, chunk), summed over the recorded prompt tokens.

        `rows`: the attention is that of these positions among the call's last `n` only (rows_to_record).
        """
        head_mean = head_mean.detach().float()
        if self.token_mask is None:
            return head_mean.sum(dim=1)
        weights = self.token_mask[:, -(n or head_mean.shape[1]):]
        weights = (weights if rows is None else weights[:, rows]).to(head_mean)
        return torch.einsum("bnm,bn->bm", head_mean, weights)

    def rows(self, n: int) -> torch.Tensor | None:
        """Positions among a call's last n whose attention counts for some question (None: all)."""
        if self.token_mask is None:
            return None
        return self.token_mask[:, -n:].any(dim=0).nonzero()[:, 0]

    def _mean(self) -> torch.Tensor:
        if not self.per_layer:
            raise RuntimeError("no KB attention was recorded: was a KB attached during the forward pass?")
        return torch.stack(list(self.per_layer.values())).mean(dim=0)

    def scores(self) -> torch.Tensor:
        """(B, M): KB attention on the triples, averaged over heads and KB layers, summed over the tokens,
        summing to 1 (the null slot left out)."""
        per_triple = self._mean()[:, : self.kb_size]
        return per_triple / per_triple.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    def null_share(self) -> torch.Tensor:
        """(B,): the null slot's share of all KB attention (0 without a null slot)."""
        mean = self._mean()
        if self.kb_size is None or mean.shape[-1] <= self.kb_size:
            return torch.zeros(mean.shape[0])
        return mean[:, self.kb_size:].sum(-1) / mean.sum(-1).clamp_min(1e-12)


@dataclass
class _AttachedKB:
    states: dict[int, tuple[torch.Tensor, torch.Tensor]]
    bias: dict[int, float | torch.Tensor]  # per layer, (B|1, 1, 1, M') or a float
    kb_size: int  # M: triples (padded); M' = M + 1 with a null slot
    recorder: KBAttentionRecorder | None
    value_ids: torch.Tensor | None = None  # (B|1, M', L) for the copy path
    tap_enabled: bool = False
    # KB attention of the current forward call, summed over KB layers (head mean), with its graph.
    tap: torch.Tensor | None = None
    # Knowledge tokens per chunk of the attention, None for a single pass. When chunked, the tap keeps
    # only the last position (B, 1, M'): what generation's copy path reads, without an (N, M') tensor.
    chunk_size: int | None = None
    cosine: torch.Tensor | None = None  # (B|1, M) the encoder's question-key cosines, when questions were given
    key_embeddings: torch.Tensor | None = None  # (M, d) or (B, M, d): the keys in the encoder's space (spans)
    key_norms: torch.Tensor | None = None  # (M,): their norms, when the KB version keeps them (kb_cache.key_norms)
    # The model's default chunking (attach without chunk_size): inference calls size their chunks to
    # their query rows (adaptive_chunk), and calls small enough for one chunk read the KB in one pass.
    adaptive: bool = False
    # Per KB layer, the inputs of its current attention call, until the layer's q_proj output is caught
    # for them (KBLaM._make_query_catch).
    awaiting_query: dict[int, attention.KBLayerInputs] = field(default_factory=dict)
    # A core is free for kblam (kblam.second_thread): the prompt's recorded KB attention is reduced on a
    # second thread while the next layers run (the forward call waits for it at its end: settle), and a
    # decoding step's KB attention may be split between two threads (kblam.few_rows.attend).
    beside: bool = False
    jobs: second_thread.Jobs | None = None

    def later(self, layer: int, record: Callable) -> Callable:
        """The layer's `record`, run on the second thread when it is the prompt's (the sources' rows, once
        per layer) at inference; as it is otherwise."""
        if not (self.beside and self.recorder is not None and self.recorder.wants(layer)) or torch.is_grad_enabled():
            return record

        def deferred(chunks):
            if self.jobs is None:
                self.jobs = second_thread.Jobs()
            self.jobs.put(lambda: record(chunks))

        return deferred

    def settle(self, quiet: bool = False) -> None:
        """Wait for the records handed to the second thread (raises their error unless quiet)."""
        jobs, self.jobs = self.jobs, None
        if jobs is not None:
            try:
                jobs.finish()
            except Exception:
                if not quiet:
                    raise

    def chunk_for(self, query_rows: int, kb_tokens: int) -> int | None:
        """The chunk size for a call with `query_rows` (batch x tokens) query rows (None: one pass)."""
        if not self.adaptive or torch.is_grad_enabled():  # training reads every position's tap: fixed rule
            return self.chunk_size
        size = adaptive_chunk(query_rows)
        return size if kb_tokens > size else None

    def rows_to_record(self, layer: int, n: int, chunked: bool) -> torch.Tensor | None:
        """The positions among a call's n whose KB attention `record` reads; None: all of them.

        Only a chunked call is narrowed (its second pass recomputes the KB logits of these rows only):
        the question's own tokens for the sources, and the last position for the tap.
        """
        if not chunked:
            return None
        wanted = [torch.tensor([n - 1])] if self.tap_enabled else []
        if self.recorder is not None and self.recorder.wants(layer):
            rows = self.recorder.rows(n)
            if rows is None:
                return None
            wanted.append(rows.cpu())
        return torch.cat(wanted).unique() if wanted else None

    def reads(self, layer: int) -> bool:
        """Whether anybody reads this layer's KB attention in the current call (sources or the tap)."""
        return self.tap_enabled or (self.recorder is not None and self.recorder.wants(layer))

    def record(self, layer: int, chunks: Iterable[tuple[int, torch.Tensor]], rows: torch.Tensor | None = None,
               n: int | None = None) -> None:
        """Consume one layer's KB attention, (start, probs (B, heads, N, chunk)) chunk by chunk; with `rows`,
        the probabilities are those of these positions among the call's last n (rows_to_record). Handed
        over only when it reads(layer)."""
        sources = self.recorder is not None and self.recorder.wants(layer)
        sums, taps = [], []
        for _, probs in chunks:
            mean = probs.float().mean(dim=1)  # (B, N, chunk)
            if sources:
                sums.append(self.recorder.token_sum(mean, rows, n))
            if self.tap_enabled:
                taps.append(mean if self.chunk_size is None and rows is None else mean[:, -1:])
        if sources:
            self.recorder.per_layer[layer] = torch.cat(sums, dim=-1)
        if taps:
            tap = torch.cat(taps, dim=-1)
            self.tap = tap if self.tap is None else self.tap + tap

    def weights(self) -> torch.Tensor:
        """(B, N, M'): this call's KB attention averaged over KB layers, renormalised over the KB.

        (B, 1, M'), the last position only, when the KB is read in chunks.
        """
        if self.tap is None:
            raise RuntimeError("no KB attention was tapped in this forward call")
        return self.tap / self.tap.sum(-1, keepdim=True).clamp_min(1e-12)


class KBLaM(nn.Module):
    """A base causal LM (frozen), its tokenizer, the KB encoder (frozen) and the trainable KB adapter."""

    def __init__(self, base_model: nn.Module, tokenizer, encoder: KBEncoder, adapter: KBAdapter):
        super().__init__()
        self.base = base_model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.adapter = adapter
        self.config = adapter.config
        # The attached KB and the LM head's input are per thread: two threads asking at once each
        # read their own KB (the hooks run in the thread that called forward).
        self._local = threading.local()
        self.calibrator: Calibrator | None = None  # kblam.confidence; loaded with a calibrated adapter
        # Scale settings (docs/scale.md). A KB of more knowledge tokens than kb_chunk_size is read in
        # chunks of that many: 8192 keeps one chunk's float32 logits near 20 MB for a 64-token prompt
        # on a 9-head model, while KBs up to that size keep the single pass (same result, one kernel
        # call). None: never chunk.
        self.kb_chunk_size: int | None = 8192
        # ask() pre-filters KBs of more than prefilter_above triples to each question's prefilter_k
        # best by key cosine (None: never). Exact FAISS search at 20,000 x 384 takes ~1 ms.
        self.prefilter_above: int | None = 20_000
        self.prefilter_k: int = 256
        # ask() prepares a question's KB (encoder call, search, candidates) on a second thread while the
        # prompt's first layers run (kblam.second_thread): True, False, or None for "when torch leaves a core free"
        self.second_thread: bool | None = None
        # Each attached KB's adapter states, pre-filter index and derived data, per KB version (kblam.kb_cache);
        # None: project the KB on every attach. kb_cache.dtype sets the precision the KB states are kept in.
        self.kb_cache: KBStateCache | None = KBStateCache()
        # A base wrapped before keeps its original implementation behind the "kblam_" prefix.
        base_impl = base_model.config._attn_implementation.removeprefix("kblam_")
        if base_impl not in attention.SUPPORTED_BASES:
            warnings.warn(f"kblam runs on sdpa or eager attention; switching this model from {base_impl} to sdpa", stacklevel=2)
            base_impl = "sdpa"
        base_model.set_attn_implementation(attention.register(base_impl))
        modules = attention_modules(base_model)
        self.adapter.bind(modules)
        self._hooks = [
            modules[layer].register_forward_pre_hook(self._make_hook(layer), with_kwargs=True)
            for layer in self.config.kb_layers
        ]
        self._catching: set[int] = set()  # KB layers whose q_proj output is caught
        if self.config.query_rank:
            # A low-rank KB query head is q_proj plus a delta: the base's own q_proj output is caught on KB
            # layers instead of multiplying by q_proj again (about 1.2 ms of a decoding pass over 10,000 triples,
            # one thread: benchmarks/decode_parts.py).
            for layer in self.config.kb_layers:
                proj = query_module(modules[layer])
                if proj is not None:
                    self._hooks.append(proj.register_forward_hook(self._make_query_catch(layer)))
                    self._catching.add(layer)
        self._hooks.append(base_model.register_forward_pre_hook(self._reset_tap))  # a fresh tap per call
        self._hooks.append(base_model.register_forward_hook(self._settle))  # records done before anyone reads them
        if self.config.copy_values or self.config.span_kinds:
            # The copy gate reads what the LM head reads.
            self._hooks.append(base_model.get_output_embeddings().register_forward_pre_hook(self._keep_lm_input))
        self.adapter.to(next(base_model.parameters()).device)

    @property
    def _attached(self) -> _AttachedKB | None:
        kb = getattr(self._local, "attached", None)
        if isinstance(kb, second_thread.Pending):  # a KB being prepared beside the prompt (kblam.second_thread)
            kb = self._local.attached = kb.result()
        return kb

    @_attached.setter
    def _attached(self, value: _AttachedKB | None) -> None:
        self._local.attached = value

    @property
    def _lm_input(self) -> torch.Tensor | None:
        return getattr(self._local, "lm_input", None)

    @_lm_input.setter
    def _lm_input(self, value: torch.Tensor | None) -> None:
        self._local.lm_input = value

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_base(
        cls,
        model: nn.Module,
        tokenizer,
        encoder: KBEncoder | str | None = None,
        *,
        kb_layers: Sequence[int] | None = None,
        kb_layer_frequency: int = 3,
        kb_scale_factor: float | None = 100.0,
        seed: int = 0,
        **options,
    ) -> KBLaM:
        """Wrap an already-loaded causal LM with a fresh (untrained) adapter, initialised from `seed`.

        KB layers are `kb_layers` if given, else every `kb_layer_frequency`-th layer from 0 (the paper's 3).
        `options` set the optional parts of KBLaMConfig (query_rank, retrieval_prior, null_slot,
        copy_values, system_prompt, ...); without them the adapter is the paper's.
        """
        encoder = _as_encoder(encoder)
        cfg = model.config
        n_layers = cfg.num_hidden_layers
        if kb_layers is None:
            if kb_layer_frequency < 1:
                raise ValueError(f"kb_layer_frequency must be >= 1, got {kb_layer_frequency}")
            kb_layers = list(range(0, n_layers, kb_layer_frequency))
        kb_layers = sorted(set(int(i) for i in kb_layers))
        if not kb_layers or kb_layers[0] < 0 or kb_layers[-1] >= n_layers:
            raise ValueError(f"kb_layers must be a non-empty subset of 0..{n_layers - 1}, got {kb_layers}")
        heads = cfg.num_attention_heads
        config = KBLaMConfig(
            base_model=cfg.name_or_path or type(model).__name__,
            base_fingerprint=weights_fingerprint(model),
            encoder=encoder.name,
            encoder_dim=encoder.dim,
            kb_layers=kb_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            num_hidden_layers=n_layers,
            kb_scale_factor=kb_scale_factor,
            **options,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same fresh adapter every time: reproducible runs and demos
            adapter = KBAdapter(config)
        adapter.init_query_heads(attention_modules(model))
        return cls(model, tokenizer, encoder, adapter)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        base_model: nn.Module | None = None,
        tokenizer=None,
        encoder: KBEncoder | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KBLaM:
        """Load an adapter folder onto the base model and encoder its config names.

        With no path: the embedded default (SmolLM2-135M-Instruct + all-MiniLM-L6-v2) with the adapter
        shipped in the package, or, while none ships, a fresh untrained one (with a warning).
        Pass `base_model`/`tokenizer`/`encoder` to use ones already loaded; they are checked against the config.
        """
        from kblam import defaults

        if path is None and not (SHIPPED_ADAPTER / CONFIG_NAME).is_file():
            warnings.warn(
                "kblam ships no trained adapter for the default model yet: the adapter is UNTRAINED, "
                "so answers will not use the knowledge base and sources are arbitrary.",
                UntrainedAdapterWarning,
                stacklevel=2,
            )
            if base_model is None:
                base_model, tokenizer = defaults.load_default_base(dtype)
            return cls.from_base(base_model, tokenizer, encoder or defaults.DEFAULT_ENCODER)
        folder = Path(path) if path is not None else SHIPPED_ADAPTER
        # The whole folder is checked (config fields, tensor names, shapes, finite values, calibration)
        # before the base model loads: a damaged adapter fails in milliseconds with the file and field named.
        config = KBLaMConfig.load(folder)
        state = load_weights(folder, config)
        calibrator = load_calibration(folder)
        if base_model is None:
            if config.base_model == defaults.DEFAULT_BASE_MODEL:
                base_model, tokenizer = defaults.load_default_base(dtype)
            else:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                base_model = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=dtype or "auto")
                tokenizer = AutoTokenizer.from_pretrained(config.base_model)
        if tokenizer is None:
            raise ValueError("a base_model was given without its tokenizer")
        fingerprint = weights_fingerprint(base_model)
        if fingerprint != config.base_fingerprint:
            raise ValueError(
                f"adapter {folder} was trained on base model {config.base_model!r} (fingerprint "
                f"{config.base_fingerprint}), but was given {base_model.config.name_or_path!r} "
                f"(fingerprint {fingerprint}): load it onto the model it was trained for"
            )
        encoder = _as_encoder(encoder or config.encoder)
        if encoder.name != config.encoder or encoder.dim != config.encoder_dim:
            raise ValueError(
                f"adapter {folder} expects encoder {config.encoder!r} ({config.encoder_dim}-d), "
                f"but was given {encoder.name!r} ({encoder.dim}-d)"
            )
        if not config.trained:
            warnings.warn(f"the adapter in {folder} is marked untrained", UntrainedAdapterWarning, stacklevel=2)
        adapter = KBAdapter(config)
        adapter.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        model = cls(base_model, tokenizer, encoder, adapter)
        model.calibrator = calibrator
        # A trained adapter reads its KB states in bfloat16 where products in it are fast: half the memory,
        # and on the shipped adapter 151 of 152 evaluation answers identical to float32, the scores equal
        # (benchmarks/precision.py, docs/performance.md). Set model.kb_cache.dtype = torch.float32 to opt out.
        if config.trained:
            model.kb_cache.dtype = kb_cache.default_state_dtype(next(adapter.parameters()).device)
        if model.kb_cache.dtype == torch.bfloat16 and torch.get_num_threads() == 1:
            few_rows.preload()  # the kernels a process of one torch thread reads bfloat16 states with
        return model

    def save_pretrained(self, folder: str | Path, *, dtype: torch.dtype = torch.float32, card: str | None = None) -> Path:
        """Write the adapter the peft way: config JSON, safetensors weights and a README model card."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.adapter.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "kblam": self.config.kblam_version})
        if self.calibrator is not None:
            self.calibrator.save(folder)
        write_model_card(folder, self.config, body=card)
        return folder

    # --- attaching a KB ------------------------------------------------------------------------

    def _make_hook(self, layer: int):
        def hook(module, args, kwargs):
            kb = self._attached
            if kb is None:
                return None
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            keys, values = kb.states[layer]
            n = hidden.shape[1]
            chunk = kb.chunk_for(hidden.shape[0] * n, keys.shape[2])
            rows = kb.rows_to_record(layer, n, chunk is not None)
            kwargs["kblam"] = attention.KBLayerInputs(
                hidden_states=hidden,
                query_head=self.adapter.query_heads[str(layer)],
                keys=keys,
                values=values,
                bias=kb.bias[layer],
                # Nobody reading it (a decoding step without the tap): no probabilities handed over, and a
                # chunked layer skips its second pass.
                record=kb.later(layer, lambda chunks: kb.record(layer, chunks, rows, n)) if kb.reads(layer) else None,
                chunk_size=chunk,
                record_rows=None if rows is None else rows.to(hidden.device),
                halves=kb.beside,
            )
            if layer in self._catching:
                kb.awaiting_query[layer] = kwargs["kblam"]
            return args, kwargs

        return hook

    def _make_query_catch(self, layer: int):
        q_out = self.adapter.query_heads[str(layer)].up.out_features

        def hook(module, args, output):
            kb = self._attached
            inputs = None if kb is None else kb.awaiting_query.pop(layer, None)
            if inputs is not None and args and args[0] is inputs.hidden_states:  # the very input the KB query reads
                inputs.base_query = output[..., :q_out]

        return hook

    def _reset_tap(self, module, args):
        kb = getattr(self._local, "attached", None)  # a KB still being prepared ahead has no tap: not waited for
        if isinstance(kb, _AttachedKB):
            kb.settle(quiet=True)  # a previous call that failed may have left records running
            kb.tap = None

    def _settle(self, module, args, output):
        kb = getattr(self._local, "attached", None)
        if isinstance(kb, _AttachedKB):
            kb.settle()

    def _keep_lm_input(self, module, args):
        self._lm_input = args[0]

    def encode_kb(self, kb: KnowledgeBase | Sequence[Triple] | KBEmbeddings | KBStore) -> KBEmbeddings:
        if isinstance(kb, (str, os.PathLike)):
            kb = load_kb(kb)  # a store folder or a KB file
        if isinstance(kb, KBEmbeddings):
            return kb
        if isinstance(kb, KBStore):
            return self._check_store(kb).embeddings()
        return self.encoder.encode_kb(kb, self.config.key_template, self.config.value_template)

    def _check_store(self, store: KBStore) -> KBStore:
        if store.encoder_name != self.encoder.name or store.dim != self.encoder.dim:
            raise ValueError(
                f"the KB store {store.path} was encoded with {store.encoder_name!r} ({store.dim}-d), but this "
                f"model reads {self.encoder.name!r} ({self.encoder.dim}-d) embeddings: rebuild it with "
                "KBStore.rebuild(path, model.encoder)"
            )
        if (store.key_template, store.value_template) != (self.config.key_template, self.config.value_template):
            warnings.warn(
                f"the KB store {store.path} encodes keys/values with templates {store.key_template!r} / "
                f"{store.value_template!r}, the adapter was trained on {self.config.key_template!r} / "
                f"{self.config.value_template!r}", stacklevel=3,
            )
        return store

    def _chunking(self, kb_tokens: int, chunk_size: int | None) -> tuple[int | None, bool]:
        """(chunk size, adaptive): chunk_size if given (0: never), else the model's kb_chunk_size, adapted per call."""
        size = self.kb_chunk_size if chunk_size is None else chunk_size
        return (size if size and kb_tokens > size else None), bool(chunk_size is None and size)

    @contextmanager
    def attach_embeddings(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        kb_mask: torch.Tensor | None = None,
        record: bool | KBAttentionRecorder = False,
        *,
        queries: torch.Tensor | None = None,
        value_ids: torch.Tensor | None = None,
        tap: bool = False,
        chunk_size: int | None = None,
        full_size: int | None = None,
    ):
        """Attach a KB given as encoder embeddings (M, d), or a batch of KBs (B, M, d) with kb_mask (B, M).

        Projected through the adapter on every call, uncached (`attach` caches): this is the training path.
        queries (B, d): the questions' encoder embeddings, for the retrieval prior.
        value_ids (B|1, M', L): the values' tokens (and the refusal's, for the null slot), for the copy path.
        tap=True keeps each call's KB attention (`model.kb_weights()`), as the copy path always does.
        chunk_size: knowledge tokens per chunk of the attention if the KB has more (default: kb_chunk_size;
        0: never chunk). Chunked, `kb_weights()` holds the last position only.
        full_size: the size of the KB these rows were picked from (a pre-filter's candidates): the size
        shift of the logits is then that of the full KB, not of the rows attached.
        Yields a KBAttentionRecorder when record=True (or the one given). Gradients flow into the adapter.
        """
        attached = self._embeddings_attachment(
            keys, values, kb_mask, record, queries=queries, value_ids=value_ids, tap=tap, chunk_size=chunk_size,
            full_size=full_size)
        with self._attaching(attached):
            yield attached.recorder

    def _embeddings_attachment(
        self, keys: torch.Tensor, values: torch.Tensor, kb_mask: torch.Tensor | None,
        record: bool | KBAttentionRecorder, *, queries: torch.Tensor | None, value_ids: torch.Tensor | None,
        tap: bool, chunk_size: int | None, full_size: int | None,
    ) -> _AttachedKB:
        """What attach_embeddings attaches: the KB projected through the adapter, its bias, chunking, recorder."""
        device = next(self.adapter.parameters()).device
        keys, values = keys.to(device, torch.float32), values.to(device, torch.float32)
        if kb_mask is not None:
            kb_mask = kb_mask.to(device, torch.bool)
        cosine = None
        if queries is not None:
            cosine = question_key_cosine(queries.to(device), keys)
            if kb_mask is not None:
                cosine = cosine.masked_fill(~kb_mask, -1.0)
        return self._attachment(
            self.adapter.kb_states(keys, values), keys.shape[-2], kb_mask, cosine, record, value_ids=value_ids,
            tap=tap, chunk_size=chunk_size, full_size=full_size, key_embeddings=keys,
        )

    @contextmanager
    def _attaching(self, attached: _AttachedKB | second_thread.Pending):
        """The forward passes inside the block read `attached` (or, once it is ready, the KB a retrieval
        ahead prepares); whatever was attached before is back after it."""
        previous = getattr(self._local, "attached", None)
        self._local.attached = attached
        try:
            yield
        finally:
            if isinstance(now := self._local.attached, _AttachedKB):
                now.settle(quiet=True)  # nothing left running on the second thread (a failed call's records)
            self._local.attached = previous

    def _attachment(
        self, states: dict[int, tuple[torch.Tensor, torch.Tensor]], kb_size: int, kb_mask: torch.Tensor | None,
        cosine: torch.Tensor | None, record: bool | KBAttentionRecorder, *, value_ids: torch.Tensor | None,
        tap: bool, chunk_size: int | None, full_size: int | None = None, key_embeddings: torch.Tensor | None = None,
        key_norms: torch.Tensor | None = None,
    ) -> _AttachedKB:
        """Projected KB states {layer: (keys, values)} as the forward passes read them (see _attaching).

        key_embeddings: the keys in the encoder's space, for the span decoder's clause prior."""
        recorder = record if isinstance(record, KBAttentionRecorder) else (KBAttentionRecorder() if record else None)
        if self.config.copy_values and value_ids is None and not tap:
            raise ValueError("this adapter copies values: pass value_ids (or use attach(kb), which makes them)")
        if recorder is not None:
            recorder.kb_size = kb_size
        device = next(self.adapter.parameters()).device
        chunk, adaptive = self._chunking(kb_size + int(self.config.null_slot), chunk_size)
        return _AttachedKB(
            states=states,
            bias=self._kb_bias(kb_size, device, kb_mask, cosine, full_size),
            kb_size=kb_size,
            recorder=recorder,
            value_ids=None if value_ids is None else value_ids.to(device),
            tap_enabled=tap or value_ids is not None,
            chunk_size=chunk,
            cosine=cosine,
            key_embeddings=key_embeddings,
            key_norms=key_norms,
            adaptive=adaptive,
            beside=second_thread.wanted(self.second_thread),
        )

    def _kb_bias(
        self, m: int, device: torch.device, kb_mask: torch.Tensor | None, cosine: torch.Tensor | None,
        full_size: int | None = None,
    ) -> dict[int, float | torch.Tensor]:
        """Per KB layer, what is added to the KB logits: the size shift, padding, prior and null slot."""
        cfg = self.config
        scale = cfg.kb_scale_factor
        if full_size is not None:
            shift = attention.kb_logit_shift(full_size, scale)
        elif kb_mask is None:
            shift = attention.kb_logit_shift(m, scale)
        else:
            # Each KB in the batch is shifted by its own size, not the padded one.
            sizes = kb_mask.sum(-1).clamp_min(1).float()
            shift = 0.0 if scale is None else (math.log(scale) - torch.log(sizes)).view(-1, 1, 1, 1)
        bias: float | torch.Tensor = shift
        if cfg.retrieval_prior and cosine is not None:
            bias = bias + self.adapter.prior_scale * cosine[:, None, None, :]
        if kb_mask is not None:
            bias = bias + torch.zeros(kb_mask.shape, device=device).masked_fill(~kb_mask, float("-inf"))[
                :, None, None, :
            ]
        if not cfg.null_slot:
            return {layer: bias for layer in cfg.kb_layers}
        triples = torch.as_tensor(bias, dtype=torch.float32, device=device)
        triples = triples.expand(*triples.shape[:-1], m) if triples.dim() == 4 else triples.expand(1, 1, 1, m)
        out = {}
        for n, layer in enumerate(cfg.kb_layers):
            # The null slot gets the same size shift as every triple, so null-versus-best-triple
            # does not move with M.
            null = torch.as_tensor(shift, dtype=torch.float32, device=device) + self.adapter.null_bias[n]
            null = null.reshape(-1, 1, 1, 1).expand(triples.shape[0], 1, 1, 1)
            out[layer] = torch.cat([triples, null], dim=-1)
        return out

    def value_ids(self, triples: Sequence[Triple]) -> torch.Tensor:
        """(1, M', L) value tokens for the copy path; the null slot's row is the refusal sentence."""
        texts = [t.value_text(self.config.value_template) for t in triples]
        ids = copying.value_token_ids(self.tokenizer, texts, self.config.max_value_tokens)
        if self.config.null_slot:
            refusal = copying.value_token_ids(
                self.tokenizer, [self.config.refusal], self.config.max_value_tokens, leading_space=False
            )
            width = max(ids.shape[1], refusal.shape[1])
            ids = torch.cat([_pad_to(ids, width), _pad_to(refusal, width)])
        return ids[None]

    @contextmanager
    def attach(
        self,
        kb: KnowledgeBase | Sequence[Triple] | KBEmbeddings | KBStore | KBStates,
        record: bool | KBAttentionRecorder = False,
        *,
        questions: str | Sequence[str] | None = None,
        chunk_size: int | None = None,
        tap: bool = False,
        copy: bool = True,
        cosine: torch.Tensor | None = None,
    ):
        """Attach a KB for the forward passes inside the block: `with model.attach(kb): ...`.

        The KB's adapter states come from the model's cache (`kb_states`): projected once per KB version.
        `questions` (one per batch row) feed the retrieval prior, when the adapter has one, and the
        question-key cosines of the answer's confidence.
        `chunk_size`, `tap`: see attach_embeddings (default: the model's kb_chunk_size).
        `copy=False`: no value tokens for the copy path (the span decoder quotes from the triples instead).
        `cosine`: the questions' kb_cosine over this KB version, when the caller has computed it already.
        """
        attached = self._kb_attachment(kb, record, questions=questions, chunk_size=chunk_size, tap=tap, copy=copy,
                                       cosine=cosine)
        with self._attaching(attached):
            yield attached.recorder

    def _kb_attachment(
        self, kb: KnowledgeBase | Sequence[Triple] | KBEmbeddings | KBStore | KBStates,
        record: bool | KBAttentionRecorder, *, questions: str | Sequence[str] | None, chunk_size: int | None,
        tap: bool, copy: bool, cosine: torch.Tensor | None,
    ) -> _AttachedKB:
        """What attach attaches (its arguments)."""
        states = kb if isinstance(kb, KBStates) else self.kb_states(kb)
        queries = None
        if questions is not None:
            questions = [questions] if isinstance(questions, str) else list(questions)
            queries = self.encoder.encode(questions)
        elif self.config.retrieval_prior:
            if questions is None:
                warnings.warn(
                    "this adapter's retrieval prior needs the question text (attach(kb, questions=...)); "
                    "without it retrieval rests on the learned keys alone",
                    stacklevel=3,
                )
        value_ids = states.derive("value_ids", self.value_ids) if self.config.copy_values and copy else None
        return self._attachment(
            self.kb_layers(states), len(states), None,
            None if queries is None else cosine if cosine is not None else self.kb_cosine(states, queries),
            record, value_ids=value_ids, tap=tap, chunk_size=chunk_size,
            key_embeddings=states.keys if tap else None, key_norms=states.key_norms if tap else None,
        )

    def kb_states(self, kb: KnowledgeBase | Sequence[Triple] | KBEmbeddings | KBStore) -> KBStates:
        """The KB as the adapter reads it at its current version (kblam.kb_cache): from `kb_cache`, built
        incrementally from the KB's previous version, or afresh when the cache is off."""
        if isinstance(kb, KBStates):
            return kb
        if isinstance(kb, KBStore):
            self._check_store(kb)
        elif not isinstance(kb, (KnowledgeBase, KBEmbeddings)):
            kb = KnowledgeBase(list(kb))
        if self.kb_cache is None:
            return kb_cache.fresh(self, kb)
        return self.kb_cache.get(self, kb)

    def kb_layers(self, states: KBStates) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (KB keys, KB values)} of a KB version, projected through the adapter on first use."""
        if self._training_adapter():  # gradients must reach the adapter: project now, keep nothing
            embeddings = states.embeddings
            device = next(self.adapter.parameters()).device
            return self.adapter.kb_states(embeddings.keys.to(device, torch.float32),
                                          embeddings.values.to(device, torch.float32))
        if states.layers is None:
            dtype = self.kb_cache.dtype if self.kb_cache is not None else torch.float32
            states.layers = project(self.adapter, states.keys, states.values, dtype)
            if self.kb_cache is not None:
                self.kb_cache.settle()
        return states.layers

    def kb_cosine(self, states: KBStates, queries: torch.Tensor) -> torch.Tensor:
        """(B, M): cosine of each question's encoder embedding with each key embedding of a KB version."""
        if states.key_norms is None:
            states.key_norms = key_norms(states.keys)
        device = next(self.adapter.parameters()).device
        keys = states.keys.to(device) if torch.is_tensor(states.keys) else states.keys  # KeptRows: read where kept
        return question_key_cosine(queries.to(device), keys, states.key_norms)

    def _training_adapter(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter.parameters())

    def kb_weights(self) -> torch.Tensor:
        """(B, N, M'): the last forward call's KB attention, mean over KB layers and heads, summing to 1."""
        if self._attached is None:
            raise RuntimeError("no KB is attached")
        return self._attached.weights()

    def copy_log_probs(
        self, logits: torch.Tensor, hidden: torch.Tensor, weights: torch.Tensor, pointer: torch.Tensor,
        value_ids: torch.Tensor,
    ) -> torch.Tensor:
        """log p of the copy mix (kblam.copying) for logits (.., V) with KB weights and pointers (.., M')."""
        features = copying.gate_features(weights, pointer, self.config.null_slot)
        gate_input = torch.cat([hidden.float(), features.float()], dim=-1).to(self.adapter.copy_gate.weight.dtype)
        gate = torch.sigmoid(self.adapter.copy_gate(gate_input).float())
        tokens = copying.candidates(pointer, value_ids)
        if self.config.copy_commit_after:
            gate = copying.commit(gate, weights, pointer, tokens, self.config.copy_commit_after)
        return copying.mix(logits, gate, weights, tokens)

    # --- running --------------------------------------------------------------------------------

    def forward(self, *args, kb=None, questions=None, **kwargs):
        """The base model's forward, reading `kb` (KnowledgeBase, triples or KBEmbeddings) if given.

        The logits are the base LM head's: the copy path's mix is applied in generate/ask (and training).
        """
        with self.attach(kb, questions=questions) if kb is not None else nullcontext():
            return self.base(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, kb=None, questions=None, **kwargs):
        """transformers' generate on the base model, reading `kb` if given (with the copy path, if any)."""
        with self.attach(kb, questions=questions) if kb is not None else nullcontext():
            return self._generate(*args, **kwargs)

    def _generate(self, *args, **kwargs):
        if self._attached is None or self._attached.value_ids is None:
            return self.base.generate(*args, **kwargs)
        from transformers import LogitsProcessorList

        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.insert(0, CopyProcessor(self, input_ids.shape[1]))
        return self.base.generate(*args, logits_processor=processors, **kwargs)

    def format_prompt(self, question: str) -> str:
        """The question as the base model expects it: its chat template if it has one."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": question}]
            if self.config.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.config.system_prompt})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"Question: {question}\nAnswer:"

    @torch.no_grad()
    def ask(
        self,
        question: str | Sequence[str],
        kb: KnowledgeBase | Sequence[Triple] | KBEmbeddings | KBStore | str | Path | None = None,
        *,
        max_new_tokens: int = 48,
        max_sources: int = 5,
        min_confidence: float | None = None,
        spans: bool | None = None,
        prefilter: bool | KBPrefilter | None = None,
        prefilter_above: int | None = None,
        prefilter_k: int | None = None,
        repair_names: bool = True,
        **generate_kwargs,
    ) -> Answer | list[Answer]:
        """Answer one question (-> Answer) or a list (-> list[Answer], generated as one batch).

        The walk is kblam.answer.ask. `kb`: a KnowledgeBase, a list of triples (duplicates merged), a
        KBStore, KBEmbeddings, or the path of a KB file or store folder.
        Sources are the max_sources triples by their share of the KB attention paid by the question's own
        tokens (the chat template around it excluded) during the prompt, averaged over heads and KB layers.
        `min_confidence`: refuse when the calibrated confidence (`Answer.confidence`) is below it
        (default: the threshold chosen on validation KBs, in the adapter's calibration.json; 0 never refuses).
        `spans`: quote whole values (kblam.spans; default when the adapter has a span or copy gate);
        False uses the token-level copy mix of adapters trained with one.
        `repair_names`: a one-letter typo in the name of an entity among the question's nearest triples
        is put right before the model reads the question ("Tanznia" -> "Tanzania"; kblam.confidence).
        Generation is greedy unless generate_kwargs (passed to transformers' generate) say otherwise,
        e.g. do_sample=True, temperature=0.7, top_k=50. Safe to call from several threads at once.

        The pre-filter: a KB of more than `prefilter_above` triples (default: the model's, 20,000) is
        narrowed to each question's `prefilter_k` (default 256) triples whose keys are closest (cosine)
        to the question's encoder embedding; the attention then reads those only. `prefilter=True`/`False`
        forces it on/off; a KBPrefilter is used as the index (its rows must be the KB's rows). Otherwise
        the index is built once per KB and cached (`prefilter_index`): pass the same KBEmbeddings or
        KBStore again to reuse it (a KnowledgeBase is re-encoded, hence re-indexed, on every call).
        """
        from kblam.answer import ask

        return ask(
            self, question, kb, max_new_tokens=max_new_tokens, max_sources=max_sources,
            min_confidence=min_confidence, spans=spans, prefilter=prefilter, prefilter_above=prefilter_above,
            prefilter_k=prefilter_k, repair_names=repair_names, **generate_kwargs,
        )

    def ask_stream(self, question: str, kb=None, **kwargs) -> AnswerStream:
        """Answer one question, its text handed over as it is generated (kblam.answer.AnswerStream):

            stream = model.ask_stream("What is the symbol of gold?", kb=kb)
            for piece in stream:
                print(piece, end="", flush=True)
            answer = stream.answer                 # the Answer ask() returns: sources, quoted, confidence, ...

        Takes ask()'s arguments. Generation runs in a worker thread until the stream is read to its end,
        left early or closed.
        """
        return AnswerStream(self, question, kb, **kwargs)

    def prefilter_index(self, kb: KnowledgeBase | KBEmbeddings | KBStore, **options) -> KBPrefilter:
        """The KBPrefilter (kblam.prefilter) over a KB's key embeddings, built on first use and cached.

        Cached with the KB's other states (`kb_cache`): per KB version (a change to a KnowledgeBase or
        KBStore is a new version, hence a new index). `options` go to KBPrefilter (kind, nlist, nprobe,
        ...) and force a rebuild.
        """
        return self._prefiltered(self.kb_states(kb), **options)[0]

    def _prefiltered(self, states: KBStates, index: KBPrefilter | None = None, **options) -> tuple[KBPrefilter, tuple]:
        """(index, (keys, values, triples)) of a KB version; the index given, else the cached one (built if need be).

        For a store the rows are its memory maps (no copy once compacted; with updates pending,
        key_matrix() gathers the live rows: once per version here, not on every ask).
        """
        if states.view is None:
            if states.from_store:  # rows read on demand: a question reads its candidates' rows only
                states.view = self._check_store(states.store).view()
            else:
                states.view = (states.keys, states.values, states.triples)
        if index is None and (options or states.index is None):
            # A store's own index is saved in it (memory-mapped, kept current across edits).
            states.index = states.store.prefilter() if states.from_store and not options else KBPrefilter(
                states.view[0][:], **options)  # [:]: KeptRows gathered
            if self.kb_cache is not None:
                self.kb_cache.settle()
        return index or states.index, states.view

    def _candidates_attachment(
        self, states: KBStates, questions: list[str], recorder: KBAttentionRecorder, k: int,
        index: KBPrefilter | None, tap: bool = False, copy: bool = True, rows: torch.Tensor | None = None,
    ) -> tuple[_AttachedKB, Callable[[int, int], Triple | None]]:
        """Each question's top-k triples (by key cosine) as a batch of KBs to attach; map sources back.
        `rows` (B, k'): those triples' rows, when the caller has searched the index for these questions.

        The logits keep the size shift of the FULL KB (full_size): the shift log(C) - log(M) is what
        the adapter was trained with so that the KB's total pull on the text stays level as M grows.
        Shifting by log(k) instead would raise every candidate's logit by log(M / k) (+8.3 at 1M
        triples) and let 256 triples draw as much mass as the whole KB should. With the full shift each
        candidate gets exactly the logit it has in the full attention, so the result is the full
        attention minus the tail the pre-filter cut (mass that low-cosine keys would barely draw).
        """
        queries = self.encoder.encode(questions)  # (B, d): the question in the keys' encoder space
        index, (all_keys, all_values, triples) = self._prefiltered(states, index)
        if rows is None:
            rows = torch.from_numpy(index.search(queries.numpy(), k)[1])  # (B, k'), -1 where an approximate index found fewer
        mask, take = rows >= 0, rows.clamp_min(0)
        if states.from_store:
            # Only the candidates' rows are read from the memory-mapped float16 files.
            flat = take.reshape(-1).numpy()
            keys = torch.from_numpy(all_keys[flat]).float().view(*take.shape, -1)
            values = torch.from_numpy(all_values[flat]).float().view(*take.shape, -1)
        else:
            keys, values = all_keys[take], all_values[take]
        pick = getattr(triples, "take", None)  # a store's view reads a row's candidates in one call
        candidates = [pick(row) if pick else [triples[j] for j in row] for row in take.tolist()]
        value_ids = None
        if self.config.copy_values and copy:
            per_row = [self.value_ids(row)[0] for row in candidates]  # (k' [+ 1], L) each
            width = max(ids.shape[-1] for ids in per_row)
            value_ids = torch.stack([_pad_to(ids, width) for ids in per_row])
        attached = self._embeddings_attachment(
            keys, values, mask, recorder, queries=queries, value_ids=value_ids, tap=tap, chunk_size=None,
            full_size=len(states),
        )
        return attached, lambda i, j: candidates[i][j] if j < mask.shape[1] and mask[i, j] else None


# Query rows x knowledge tokens per chunk of an inference call: 2^17 keeps a chunk's float32 logits (9 heads:
# 4.7 MB) in this CPU's caches, so that the passes over them run from cache, not memory. Measured while
# developing (bfloat16 states, one thread): 16 prompts x 40 tokens over 10,000 triples 663 ms per layer in chunks of 8,192,
# 168 ms in chunks of 256; one prompt over 100,000 triples 148 ms in chunks of 8,192, 107 ms in 2,048.
CHUNK_ROWS_X_TOKENS = 1 << 17


def adaptive_chunk(query_rows: int) -> int:
    """Knowledge tokens per chunk for an inference call with `query_rows` query rows: a power of two, at
    least 256, with query rows x tokens <= CHUNK_ROWS_X_TOKENS (a decoding step of one question: 131,072)."""
    return 1 << max(8, (CHUNK_ROWS_X_TOKENS // max(query_rows, 1)).bit_length() - 1)


def question_token_mask(
    prompts: list[str], questions: list[str], offsets: torch.Tensor | None, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Which prompt tokens belong to the question itself, not the chat template around it.

    Sources are read from these tokens' KB attention; without offsets (slow tokenizers), from all tokens.
    """
    if offsets is None:
        return attention_mask.bool()
    mask = attention_mask.bool().clone()
    for i, (prompt, question) in enumerate(zip(prompts, questions, strict=True)):
        start = prompt.rfind(question)
        if start < 0:
            continue
        inside = (offsets[i, :, 0] < start + len(question)) & (offsets[i, :, 1] > start)
        mask[i] &= inside
    return mask


class CopyProcessor:
    """Turns each generation step's logits into the copy mix's log-probabilities (kblam.copying)."""

    def __init__(self, model: KBLaM, prompt_length: int):
        self.model, self.prompt_length = model, prompt_length
        self.pointer: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kb = self.model._attached
        ids = kb.value_ids
        if self.pointer is None or input_ids.shape[1] == self.prompt_length:
            self.pointer = torch.zeros(input_ids.shape[0], ids.shape[1], dtype=torch.long, device=input_ids.device)
        else:
            self.pointer = copying.advance(self.pointer, input_ids[:, -1], ids)
        weights = kb.weights()[:, -1]
        hidden = self.model._lm_input[:, -1]
        return self.model.copy_log_probs(scores, hidden, weights, self.pointer, ids).to(scores.dtype)


def _pad_to(ids: torch.Tensor, width: int) -> torch.Tensor:
    return nn.functional.pad(ids, (0, width - ids.shape[1]), value=copying.PAD)


def question_key_cosine(queries: torch.Tensor, keys: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """(B, M): cosine of each question's encoder embedding (B, d) with each key embedding ((B|1,) M, d).

    `norms` (M,): the keys' norms (kblam.kb_cache.key_norms), when kept: the keys are not normalised again.
    """
    norms = key_norms(keys) if norms is None else norms
    if not torch.is_tensor(keys) or keys.dim() == 2 and keys.dtype in (torch.float16, torch.bfloat16):  # or KeptRows
        cosine = _times_half_rows(keys, nn.functional.normalize(queries.float(), dim=-1))
        return cosine / norms.to(cosine.device)
    q = nn.functional.normalize(queries.to(keys), dim=-1)
    # keys x questions, each key row read where it lies: q @ keys^T (a transposed operand) ran as a batched
    # product at a fifth of the speed (7.4 against 1.5 ms over 10,000 keys, one thread; issue 10).
    cosine = (keys @ q.T).T if keys.dim() == 2 else torch.bmm(keys, q[:, :, None])[..., 0]
    return cosine / norms.to(keys)


def _times_half_rows(keys: torch.Tensor, q: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """(B, M) float32 q (B, d) x keys (M, d) of float16 (a KB as the encoder and the store keep it; KeptRows), 512 rows
    at a time widened into one float32 block: the float32 path's cosines, bit for bit, without a float32 copy
    of the whole KB. A float16 product would round them (with the retrieval prior, enough to move the sources'
    scores past tests/test_scale.py's tolerance); this costs about what float32 keys do (measured while
    developing, one thread: 0.66 against 0.54 ms over 10,000 keys, 11.0 against 10.1 over 100,000)."""
    out = torch.empty(q.shape[0], keys.shape[0], device=q.device)
    block = torch.empty(min(rows, keys.shape[0]), keys.shape[1], device=q.device)
    for start in range(0, keys.shape[0], rows):
        part = block[:min(rows, keys.shape[0] - start)].copy_(keys[start:start + rows])
        out[:, start:start + part.shape[0]] = (part @ q.T).T
    return out


class UntrainedAdapterWarning(UserWarning):
    """The adapter in use has not been trained: the KB cannot inform answers yet."""


def _as_encoder(encoder) -> KBEncoder:
    from kblam import defaults

    if encoder is None:
        return defaults.load_default_encoder()
    if isinstance(encoder, KBEncoder):
        return encoder
    if isinstance(encoder, str):
        return defaults.load_encoder(encoder)
    return KBEncoder(encoder)  # a sentence-transformers model already loaded
