"""kblam: knowledge bases that a frozen Hugging Face causal LM reads directly (KBLaM, Wang et al., ICLR 2025)."""

from kblam._version import __version__
from kblam.adapter_check import AdapterLoadError
from kblam.kb import KBFormatError, KnowledgeBase, Triple

__all__ = ["KBLaM", "Answer", "KBEncoder", "KnowledgeBase", "Triple", "KBFormatError", "AdapterLoadError", "__version__"]


def __getattr__(name):
    # torch and transformers load only when the model side is used: `kblam kb inspect` stays fast.
    if name in ("KBLaM", "Answer", "UntrainedAdapterWarning"):
        from kblam import model

        return getattr(model, name)
    if name == "KBEncoder":
        from kblam.encoder import KBEncoder

        return KBEncoder
    raise AttributeError(f"module 'kblam' has no attribute {name!r}")
