"""Training checkpoints without pickle: one safetensors file, its JSON in the header.

A checkpoint holds the adapter's weights, the optimizer's state (its tensors; its numbers and
hyper-parameters as JSON), the torch RNG state and the step, so a resumed run is bit-identical to an
uninterrupted one. Everything is one file so that an atomic rename replaces the whole of it: a crash
mid-save leaves the previous checkpoint. safetensors parses only a JSON header and raw tensor bytes,
so a file that is not one (a pickle that would run code when loaded, say) is refused unread.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kblam._version import __version__

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "kblam-training-checkpoint"
_HEADER_KEY = "kblam"  # safetensors metadata is str -> str: the JSON part lives under one key


class CheckpointError(ValueError):
    """A file that is not a kblam checkpoint or adapter (pickles included: kblam never unpickles)."""


def save_checkpoint(path: str | Path, model, optimizer, step: int) -> Path:
    """Atomically write the adapter, the optimizer state, the RNG state and the step to `path`."""
    path = Path(path)
    tensors = {f"adapter.{k}": v.detach().to("cpu").contiguous() for k, v in model.adapter.state_dict().items()}
    state = optimizer.state_dict()
    numbers: dict[str, dict] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                numbers.setdefault(str(index), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    header = {
        "format": FORMAT, "kblam_version": __version__, "step": step,
        "base_fingerprint": model.config.base_fingerprint,
        "optimizer": {"param_groups": state["param_groups"], "numbers": numbers},
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(header)})
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a checkpoint file; CheckpointError for anything else, read no further."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get(_HEADER_KEY, "{}"))
            if header.get("format") != FORMAT:
                raise CheckpointError(f"{path} is a safetensors file but not a kblam training checkpoint")
            return header, {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as error:
        raise CheckpointError(
            f"{path} is not a safetensors checkpoint ({error}); kblam does not read pickled files "
            "(.pt/.bin), because unpickling can run any code the file carries"
        ) from None


def load_checkpoint(path: str | Path, model, optimizer=None) -> int:
    """Restore the adapter (and, given one, the optimizer and the RNG) from `path`; returns the step."""
    header, tensors = read_checkpoint(path)
    _check_base(path, header.get("base_fingerprint"), model)
    model.adapter.load_state_dict(_prefixed(tensors, "adapter."), strict=True)
    if optimizer is not None:
        saved = header["optimizer"]
        state: dict[int, dict] = {}
        for key, value in _prefixed(tensors, "optimizer.").items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for index, values in saved["numbers"].items():
            state.setdefault(int(index), {}).update(values)
        groups = [
            {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in group.items()}  # JSON made tuples lists
            for group, now in zip(saved["param_groups"], optimizer.param_groups, strict=True)
        ]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
    return int(header["step"])


def load_adapter_weights(source: str | Path, model) -> str:
    """Start `model`'s adapter from an exported adapter folder, a checkpoint file, or a run folder.

    Only the parts both adapters share (same name, same shape) are read, so a second stage may add
    parts (a span gate, say) to the first stage's adapter. Returns what was read, for the log. The
    source must have been trained on the same base model.
    """
    from safetensors.torch import load_file

    from kblam.adapter import CONFIG_NAME, WEIGHTS_NAME, KBLaMConfig

    source = Path(source)
    if source.is_dir() and (source / CONFIG_NAME).is_file():
        _check_base(source, KBLaMConfig.load(source).base_fingerprint, model)
        try:
            state = load_file(str(source / WEIGHTS_NAME))
        except SafetensorError as error:
            raise CheckpointError(f"{source / WEIGHTS_NAME} is not a safetensors file ({error})") from None
        what = f"the adapter folder {source}"
    else:
        if source.is_dir():
            source = source / CHECKPOINT
        if not source.is_file():
            raise FileNotFoundError(
                f"init_from {source}: neither an adapter folder ({CONFIG_NAME}), nor a run folder or file "
                f"holding a {CHECKPOINT}"
            )
        header, tensors = read_checkpoint(source)
        _check_base(source, header.get("base_fingerprint"), model)
        state, what = _prefixed(tensors, "adapter."), f"the checkpoint {source}"
    own = model.adapter.state_dict()
    shared = {k: v.float() for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.adapter.load_state_dict(shared, strict=False)
    new = sorted(set(own) - set(shared))
    return what + (f"; new: {new}" if new else "")


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_base(source, fingerprint: str | None, model) -> None:
    if fingerprint and fingerprint != model.config.base_fingerprint:
        raise CheckpointError(
            f"{source} was trained on a base model with fingerprint {fingerprint}, this run's base "
            f"{model.config.base_model!r} has {model.config.base_fingerprint}: start from an adapter of the same base"
        )
