"""Loading checkpoints written by the original inplace-abn (1.1.0 or earlier) into this package's models.

The tensors load unchanged; :func:`load_inplace_abn_v1_state_dict` handles the containers, the
``"module."`` prefix of ``nn.DataParallel`` / DDP checkpoints and the ``_metadata`` versions. Re-exported
by :mod:`inplace_abn.convert`, where 1.1.0-era and user code imports it from.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["load_inplace_abn_v1_state_dict"]

#: Keys under which training scripts commonly wrap the weights, in the order they are looked up.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")


def _rename(state: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
    """A copy of ``state`` with the key prefix ``old`` replaced by ``new``, ``_metadata`` versions included."""
    out = type(state)() if isinstance(state, dict) else {}
    for k, v in state.items():
        out[new + k[len(old) :] if k.startswith(old) else k] = v
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        renamed = type(metadata)()
        for k, v in metadata.items():
            if k == old.rstrip("."):
                renamed[new.rstrip(".")] = v
            elif k.startswith(old):
                renamed[new + k[len(old) :]] = v
            else:
                renamed[k] = v
        out._metadata = renamed  # type: ignore[attr-defined]
    return out


# The first bytes of a file written by torch.save's legacy (pre-1.6, non-zip) format: its pickled magic number.
_LEGACY_HEAD = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:12]


def _load_file(path: str | os.PathLike, weights_only: bool) -> Any:
    """``torch.load`` of a checkpoint file, with errors that name the file and tell corrupt from untrusted."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"state_dict_or_path: checkpoint file {os.fspath(path)!r} not found")
    if os.path.getsize(path) == 0:
        raise ValueError(
            f"state_dict_or_path: checkpoint file {os.fspath(path)!r} is empty (0 bytes): an "
            "interrupted write or copy; copy the checkpoint again"
        )
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_HEAD))
    if not (zipfile.is_zipfile(path) or head == _LEGACY_HEAD):
        raise ValueError(
            f"state_dict_or_path: {os.fspath(path)!r} is not a PyTorch checkpoint (corrupt, truncated "
            "or another format); copy the checkpoint again"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if not weights_only:
            raise ValueError(f"state_dict_or_path: checkpoint {os.fspath(path)!r} is corrupt ({e})") from e
        raise ValueError(
            f"state_dict_or_path: checkpoint {os.fspath(path)!r} could not be loaded with weights_only=True: it is "
            "corrupt, or it pickles objects other than tensors and containers. Only if the file is intact and "
            f"from a source you trust, pass weights_only=False. ({e})"
        ) from e
    except Exception as e:  # noqa: BLE001 - a damaged archive or truncated pickle fails in many ways
        raise ValueError(
            f"state_dict_or_path: checkpoint {os.fspath(path)!r} is corrupt or truncated "
            f"({type(e).__name__}: {e}); copy the checkpoint again"
        ) from e


def load_inplace_abn_v1_state_dict(
    model: nn.Module,
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike | Any,
    strict: bool = True,
    *,
    weights_only: bool = True,
) -> Any:
    """Loads a checkpoint written with the original inplace-abn (1.1.0 or earlier) into ``model``.

    The layers of 1.1.0 have the parameters / buffers of ``nn.BatchNorm2d`` (weight, bias, running_mean,
    running_var, num_batches_tracked) with the same meaning (``|w| + eps`` for the in-place layers, raw
    weight for ``ABN``), so the tensors load unchanged. This helper handles what differs in practice:

    * a path or file object (read with ``torch.load(map_location="cpu", weights_only=weights_only)``; pass
      ``weights_only=False`` only for trusted files that pickle other objects, e.g. an argparse Namespace);
    * a dict wrapping the weights under ``"state_dict"``, ``"model_state_dict"`` or ``"model"`` (the first
      one present that is a mapping);
    * the ``"module."`` prefix of checkpoints saved from ``nn.DataParallel`` / DDP (stripped, repeatedly, when
      every key has it and the model's keys do not; added when the model is the wrapped one);
    * checkpoints without ``num_batches_tracked`` (pre-1.0 layers, or metadata lost in renaming): our
      layers and ``nn.BatchNorm`` start the count at 0 (version-based backfill); the prefix renaming keeps
      the ``_metadata`` versions consistent.

    Returns:
        What ``model.load_state_dict`` returns (missing and unexpected keys, with ``strict=False``).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is empty, corrupt, truncated, not a PyTorch checkpoint, or (with
            ``weights_only=True``) pickles other objects (the message names the file).
    """
    obj = state_dict_or_path
    if isinstance(obj, (str, os.PathLike)):
        obj = _load_file(obj, weights_only)
    elif hasattr(obj, "read"):
        obj = torch.load(obj, map_location="cpu", weights_only=weights_only)
    for key in _CONTAINER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (or a checkpoint holding one), got {type(obj).__name__}")
    state = obj
    model_keys = list(model.state_dict().keys())
    prefix = "module."
    while state and all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in model_keys):
        state = _rename(state, prefix, "")
    if (
        state
        and model_keys
        and all(k.startswith(prefix) for k in model_keys)
        and not any(k.startswith(prefix) for k in state)
    ):
        state = _rename(state, "", prefix)
    if not isinstance(state, dict) or state is obj:
        state = _rename(state, "", "")  # a copy: loading backfills num_batches_tracked into it
    return model.load_state_dict(state, strict=strict)
