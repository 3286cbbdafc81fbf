"""Random-weight training runs for the memory checks (plan_check.py on a CPU, gpu_check.py on a GPU).

Nothing is downloaded: the base is a stored config (kblam.configs) at full or reduced size with
random weights, the tokenizer is word-level over the training data's own words with a ChatML chat
template (token ids below the model's vocabulary, so the logits keep their real size), and the
encoder is the tests' hash encoder (384-d, as MiniLM). The loop is `kblam.training.loop.train`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_tokenizer(texts: list[str], vocab_size: int):
    """A word-level fast tokenizer over `texts` (words and punctuation), with a ChatML chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kblam.adapter import REFUSAL

    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for text in [*texts, REFUSAL] for w, _ in splitter.pre_tokenize_str(text)} - set(special))
    vocab = {w: i for i, w in enumerate(special + words[: vocab_size - len(special)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>", additional_special_tokens=special[2:4])
    tokenizer.chat_template = CHATML
    return tokenizer


def hash_encoder():
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import HashEncoder  # one home for the test encoder

    from kblam.encoder import KBEncoder

    return KBEncoder(HashEncoder(dim=384), name="test/hash-encoder-384")


def random_base(config, dtype: torch.dtype, device: str):
    """A random-weight causal LM from `config`, made directly on `device` (no copy through the CPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def setup(cfg, config, *, device: str, dtype: torch.dtype, entities: int = 300, examples: int = 400):
    """(model, data) for a random-weight run of recipe `cfg` on a base made from `config`."""
    from kblam.kb import KEY_TEMPLATE
    from kblam.model import KBLaM
    from kblam.training.data import build_examples, prepare

    pool, rows = build_examples(entities, examples, seed=cfg.seed, split="train", kb_size=tuple(cfg.kb_size),
                                mix=cfg.mix, whole_entities=cfg.whole_entities, variants=cfg.variants)
    texts = [t.key_text(KEY_TEMPLATE) + " " + t.value for t in pool] + [r["question"] + " " + r["answer"] for r in rows]
    tokenizer = word_tokenizer(texts, config.vocab_size)
    base = random_base(config, dtype, device)
    options = {k: v for k, v in cfg.adapter_options().items() if v is not None or k == "system_prompt"}
    model = KBLaM.from_base(base, tokenizer, hash_encoder(), seed=cfg.seed, **options)
    return model, prepare(model, pool, rows)


def longest_batches(cfg, model, data, steps: int) -> tuple[int, int]:
    """(tokens, answer tokens) of the longest micro-batch the first `steps` steps of `train` will see."""
    from kblam.training.data import collate
    from kblam.training.loop import step_rows

    longest, answer = 0, 0
    for step in range(steps):
        rows = step_rows(len(data.examples), step, cfg.batch_size * cfg.grad_accum, cfg.seed)
        for micro in range(cfg.grad_accum):
            batch = collate(model, data, rows[micro * cfg.batch_size:(micro + 1) * cfg.batch_size])
            longest = max(longest, batch.input_ids.shape[1])
            answer = max(answer, int(batch.answer_length.max()))
    return longest, answer
