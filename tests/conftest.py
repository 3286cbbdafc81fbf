"""Tiny random-weight models of each supported family, built from configs: nothing is downloaded."""

from __future__ import annotations

import hashlib

import pytest
import torch

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"]
ENCODER_DIM = 24


def tiny_config(family: str):
    import transformers as tf

    common = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=8, **common)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=None, **common)
    if family == "phi3":
        return tf.Phi3Config(sliding_window=None, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(head_dim=8, sliding_window=4, query_pre_attn_scalar=8, **common)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


class HashEncoder:
    """A deterministic stand-in for a sentence encoder: each text maps to a fixed random unit vector.

    It lets tests run the KB encoding path (templates, cache) without loading MiniLM.
    """

    name_or_path = "test/hash-encoder"

    def __init__(self, dim: int = ENCODER_DIM):
        self.dim = dim
        self.calls: list[str] = []

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False):
        self.calls.extend(texts)
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
            rows.append(v / v.norm())
        return torch.stack(rows)


@pytest.fixture
def hash_encoder():
    from kblam.encoder import KBEncoder

    return KBEncoder(HashEncoder(), name="test/hash-encoder")


def random_kb(m: int, dim: int = ENCODER_DIM, seed: int = 0):
    """KBEmbeddings of m synthetic triples with random key/value embeddings."""
    from kblam.encoder import KBEmbeddings
    from kblam.kb import Triple

    g = torch.Generator().manual_seed(seed)
    triples = tuple(Triple(f"entity {j}", "property", f"value {j}") for j in range(m))
    return KBEmbeddings(triples, torch.randn(m, dim, generator=g), torch.randn(m, dim, generator=g))


def wrap(family: str, encoder, seed: int = 0, **kwargs):
    """A KBLaM over a tiny model, its adapter randomised so that the KB path matters in comparisons."""
    from kblam import KBLaM

    model = KBLaM.from_base(tiny_model(family, seed), tokenizer=None, encoder=encoder, **kwargs)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def ask_model(family: str, encoder, **options):
    """A wrapped tiny model with the character tokenizer, ready for ask()."""
    model = wrap(family, encoder, **options)
    model.tokenizer = tiny_tokenizer()
    return model


def tiny_tokenizer():
    """A character-level fast tokenizer of < 128 tokens (fits the tiny models' vocabulary), built offline."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + " .,'?-:!"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    assert len(vocab) <= 128
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# An adapter config with every optional part on, for a 3-layer base that never needs to exist: tests
# of reading adapter folders (tests/test_adapter_loading.py, test_fuzz.py, test_cli_hardening.py).
TINY_ADAPTER = dict(base_model="test/tiny", base_fingerprint="0123456789abcdef", encoder="test/hash-encoder",
                    encoder_dim=8, kb_layers=[0, 2], hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=4, num_hidden_layers=3, query_rank=2, retrieval_prior=True, null_slot=True,
                    copy_values=True, trained=True)


def save_tiny_adapter(folder, seed: int = 0):
    """Write an adapter folder (config + seeded random weights) as save_pretrained would, without a base."""
    from safetensors.torch import save_file

    from kblam.adapter import WEIGHTS_NAME, KBAdapter, KBLaMConfig

    config = KBLaMConfig(**TINY_ADAPTER)
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder)
    torch.manual_seed(seed)
    save_file({k: v.contiguous() for k, v in KBAdapter(config).state_dict().items()}, str(folder / WEIGHTS_NAME))
    return folder


def write_file(tmp_path, name: str, data: str | bytes, encoding: str = "utf-8"):
    """A KB file under tmp_path: text in `encoding`, or bytes as they are."""
    path = tmp_path / name
    path.write_bytes(data.encode(encoding) if isinstance(data, str) else data)
    return path


def format_error(fn, *args, **kw):
    """The KBFormatError that fn(*args, **kw) raises."""
    from kblam.kb import KBFormatError

    with pytest.raises(KBFormatError) as info:
        fn(*args, **kw)
    return info.value
