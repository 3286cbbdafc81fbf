"""KBLaM: a frozen Hugging Face causal LM that reads a knowledge base through a trained adapter."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kblam import attention, copying
from kblam.adapter import CONFIG_NAME, WEIGHTS_NAME, KBAdapter, KBLaMConfig
from kblam.encoder import KBEmbeddings, KBEncoder
from kblam.kb import KnowledgeBase, Triple
from kblam.model_card import write_model_card

SHIPPED_ADAPTER = Path(__file__).parent / "adapters" / "smollm2-135m-instruct"


@dataclass
class Answer:
    """A generated answer and the triples the model drew on, best first, with their share of KB attention."""

    question: str
    text: str
    sources: list[tuple[Triple, float]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text


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
    """Keeps the KB attention on the triples of the first call on each KB layer (the prompt's prefill)."""

    def __init__(self):
        self.per_layer: dict[int, torch.Tensor] = {}

    def record(self, layer: int, probs: torch.Tensor) -> None:  # (B, heads, N, M)
        if layer not in self.per_layer:
            self.per_layer[layer] = probs.detach().float().mean(dim=1)

    def scores(self, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, M): KB attention averaged over heads, KB layers and (unpadded) prompt tokens, summing to 1."""
        if not self.per_layer:
            raise RuntimeError("no KB attention was recorded: was a KB attached during the forward pass?")
        probs = torch.stack(list(self.per_layer.values())).mean(dim=0)  # (B, N, M)
        if token_mask is not None:
            weights = token_mask[:, -probs.shape[1]:].to(probs)
            probs = probs * weights[..., None]
        per_triple = probs.sum(dim=1)
        return per_triple / per_triple.sum(dim=-1, keepdim=True).clamp_min(1e-12)


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
    tapped: int = 0

    def record(self, layer: int, probs: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.record(layer, probs[..., : self.kb_size])
        if self.tap_enabled:
            mean = probs.float().mean(dim=1)
            self.tap = mean if self.tap is None else self.tap + mean
            self.tapped += 1

    def weights(self) -> torch.Tensor:
        """(B, N, M'): this call's KB attention averaged over KB layers, renormalised over the KB."""
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
        self._attached: _AttachedKB | None = None
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
        self._lm_input: torch.Tensor | None = None
        self._hooks.append(base_model.register_forward_pre_hook(self._reset_tap))  # a fresh tap per call
        if self.config.copy_values:
            # The copy gate reads what the LM head reads.
            self._hooks.append(base_model.get_output_embeddings().register_forward_pre_hook(self._keep_lm_input))
        self.adapter.to(next(base_model.parameters()).device)

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
        config = KBLaMConfig.load(folder)
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
        state = load_file(str(folder / WEIGHTS_NAME))
        adapter.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return cls(base_model, tokenizer, encoder, adapter)

    def save_pretrained(self, folder: str | Path, *, dtype: torch.dtype = torch.float32, card: str | None = None) -> Path:
        """Write the adapter the peft way: config JSON, safetensors weights and a README model card."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.adapter.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "kblam": self.config.kblam_version})
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
            kwargs["kblam"] = attention.KBLayerInputs(
                hidden_states=hidden,
                query_head=self.adapter.query_heads[str(layer)],
                keys=keys,
                values=values,
                bias=kb.bias[layer],
                record=lambda probs: kb.record(layer, probs),
            )
            return args, kwargs

        return hook

    def _reset_tap(self, module, args):
        if self._attached is not None:
            self._attached.tap, self._attached.tapped = None, 0

    def _keep_lm_input(self, module, args):
        self._lm_input = args[0]

    def encode_kb(self, kb: KnowledgeBase | Sequence[Triple] | KBEmbeddings) -> KBEmbeddings:
        if isinstance(kb, KBEmbeddings):
            return kb
        return self.encoder.encode_kb(kb, self.config.key_template, self.config.value_template)

    @contextmanager
    def attach_embeddings(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        kb_mask: torch.Tensor | None = None,
        record: bool = False,
        *,
        queries: torch.Tensor | None = None,
        value_ids: torch.Tensor | None = None,
        tap: bool = False,
    ):
        """Attach a KB given as encoder embeddings (M, d), or a batch of KBs (B, M, d) with kb_mask (B, M).

        queries (B, d): the questions' encoder embeddings, for the retrieval prior.
        value_ids (B|1, M', L): the values' tokens (and the refusal's, for the null slot), for the copy path.
        tap=True keeps each call's KB attention (`model.kb_weights()`), as the copy path always does.
        Yields a KBAttentionRecorder when record=True. Gradients flow into the adapter (for training).
        """
        device = next(self.adapter.parameters()).device
        keys, values = keys.to(device, torch.float32), values.to(device, torch.float32)
        if kb_mask is not None:
            kb_mask = kb_mask.to(device, torch.bool)
        recorder = KBAttentionRecorder() if record else None
        if self.config.copy_values and value_ids is None:
            raise ValueError("this adapter copies values: pass value_ids (or use attach(kb), which makes them)")
        previous = self._attached
        self._attached = _AttachedKB(
            states=self.adapter.kb_states(keys, values),
            bias=self._kb_bias(keys, kb_mask, queries),
            kb_size=keys.shape[-2],
            recorder=recorder,
            value_ids=None if value_ids is None else value_ids.to(device),
            tap_enabled=tap or value_ids is not None,
        )
        try:
            yield recorder
        finally:
            self._attached = previous

    def _kb_bias(
        self, keys: torch.Tensor, kb_mask: torch.Tensor | None, queries: torch.Tensor | None
    ) -> dict[int, float | torch.Tensor]:
        """Per KB layer, what is added to the KB logits: the size shift, padding, prior and null slot."""
        cfg, m = self.config, keys.shape[-2]
        scale = cfg.kb_scale_factor
        if kb_mask is None:
            shift = attention.kb_logit_shift(m, scale)
        else:
            # Each KB in the batch is shifted by its own size, not the padded one.
            sizes = kb_mask.sum(-1).clamp_min(1).float()
            shift = 0.0 if scale is None else (math.log(scale) - torch.log(sizes)).view(-1, 1, 1, 1)
        bias: float | torch.Tensor = shift
        if cfg.retrieval_prior and queries is not None:
            cosine = nn.functional.normalize(queries.to(keys), dim=-1)[:, None, :] @ nn.functional.normalize(
                keys, dim=-1
            ).transpose(-1, -2)  # (B, 1, M)
            bias = bias + self.adapter.prior_scale * cosine[:, None]
        if kb_mask is not None:
            bias = bias + torch.zeros(kb_mask.shape, device=keys.device).masked_fill(~kb_mask, float("-inf"))[
                :, None, None, :
            ]
        if not cfg.null_slot:
            return {layer: bias for layer in cfg.kb_layers}
        triples = torch.as_tensor(bias, dtype=torch.float32, device=keys.device)
        triples = triples.expand(*triples.shape[:-1], m) if triples.dim() == 4 else triples.expand(1, 1, 1, m)
        out = {}
        for n, layer in enumerate(cfg.kb_layers):
            # The null slot gets the same size shift as every triple, so null-versus-best-triple
            # does not move with M.
            null = torch.as_tensor(shift, dtype=torch.float32, device=keys.device) + self.adapter.null_bias[n]
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
        kb: KnowledgeBase | Sequence[Triple] | KBEmbeddings,
        record: bool = False,
        *,
        questions: str | Sequence[str] | None = None,
    ):
        """Attach a KB for the forward passes inside the block: `with model.attach(kb): ...`.

        `questions` (one per batch row) feed the retrieval prior, when the adapter has one.
        """
        embeddings = self.encode_kb(kb)
        queries = None
        if self.config.retrieval_prior:
            if questions is None:
                warnings.warn(
                    "this adapter's retrieval prior needs the question text (attach(kb, questions=...)); "
                    "without it retrieval rests on the learned keys alone",
                    stacklevel=3,
                )
            else:
                questions = [questions] if isinstance(questions, str) else list(questions)
                queries = self.encoder.encode(questions)
        value_ids = self.value_ids(embeddings.triples) if self.config.copy_values else None
        with self.attach_embeddings(
            embeddings.keys, embeddings.values, record=record, queries=queries, value_ids=value_ids
        ) as recorder:
            yield recorder

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
        return copying.mix(logits, gate, weights, copying.candidates(pointer, value_ids))

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
        processors.insert(0, _CopyProcessor(self, input_ids.shape[1]))
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
        kb: KnowledgeBase | Sequence[Triple] | KBEmbeddings | None = None,
        *,
        max_new_tokens: int = 48,
        max_sources: int = 5,
        **generate_kwargs,
    ) -> Answer | list[Answer]:
        """Answer one question (-> Answer) or a list (-> list[Answer], generated as one batch).

        Sources are the max_sources triples by their share of the KB attention paid by the question's own tokens
        (the chat template around it excluded) during the prompt, averaged over heads and KB layers.
        Generation is greedy unless generate_kwargs (passed to transformers' generate) say otherwise,
        e.g. do_sample=True, temperature=0.7, top_k=50.
        """
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        if not questions or any(not isinstance(q, str) or not q.strip() for q in questions):
            raise ValueError("ask() needs a non-empty question string, or a list of them")
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        prompts = [self.format_prompt(q) for q in questions]
        device = next(self.base.parameters()).device
        inputs = tok(
            prompts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
            return_offsets_mapping=bool(getattr(tok, "is_fast", False)),
        )
        offsets = inputs.pop("offset_mapping", None)
        question_tokens = _question_token_mask(prompts, questions, offsets, inputs["attention_mask"])
        inputs = inputs.to(device)
        generate_kwargs.setdefault("do_sample", False)
        if not generate_kwargs["do_sample"]:
            # Greedy: drop the sampling knobs a generation_config may carry, which transformers warns about.
            for knob in ("temperature", "top_p", "top_k"):
                generate_kwargs.setdefault(knob, None)
        generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
        embeddings = self.encode_kb(kb) if kb is not None else None
        context = (
            self.attach(embeddings, record=True, questions=questions) if embeddings is not None else nullcontext()
        )
        with context as recorder:
            output = self._generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        texts = tok.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers = []
        scores = recorder.scores(question_tokens.to(device)) if recorder is not None else None
        for i, (q, text) in enumerate(zip(questions, texts, strict=True)):
            sources = []
            if scores is not None:
                best = torch.topk(scores[i], k=min(max_sources, scores.shape[-1]))
                sources = [(embeddings.triples[j], float(s)) for s, j in zip(best.values, best.indices.tolist(), strict=True)]
            answers.append(Answer(question=q, text=text.strip(), sources=sources))
        return answers[0] if single else answers


def _question_token_mask(
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


class _CopyProcessor:
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
