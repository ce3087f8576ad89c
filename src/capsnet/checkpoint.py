"""Checkpoints: safetensors weights, JSON trainer state, atomic writes and :func:`load`.

A checkpoint ``TAG`` (``last`` or ``best``) in a run directory is

* ``TAG.safetensors``: the model's ``state_dict``; its metadata holds the model name, the
  constructor kwargs and the run config as JSON, so :func:`load` rebuilds the model.
* ``TAG.json``: epoch, step, metrics and (``last`` only) the optimiser's and scheduler's
  non-tensor state.
* ``TAG.state.safetensors`` (``last`` only): the optimiser's tensors (Adam moments) and the
  random-number generator states.

Loading never executes code: weights and tensors come from safetensors, everything else
from JSON. Every file is written to a temporary name, flushed and renamed into place (other
files of a run use :func:`capsnet.io.atomic_write`, re-exported here; a checkpoint's files
use fixed temporary names ``.NAME.tmp``, which the roll-forward recognises). The files of
one checkpoint share a ``checkpoint_id``, and a save interrupted between the renames is
completed (rolled forward) on the next load, so a killed run always finds a consistent
checkpoint. Only one process (rank 0) saves a run's checkpoints.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from capsnet._checks import check_choice
from capsnet.io import atomic_write, write_flushed

__all__ = [
    "atomic_write",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_exists",
    "read_metadata",
    "resolve_weights",
    "load",
]

_FORMAT = "capsnet-checkpoint-1"


# ------------------------------------------------------------------ nested state <-> JSON


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by ``{"__tensor__": key}``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        # Optimiser state is keyed by parameter index: keep the keys' types.
        return {
            "__items__": [[k, _split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]
        }
    if isinstance(obj, list | tuple):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _join_tensors(v, tensors) for k, v in obj["__items__"]}
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------ save / load


def _paths(run_dir: Path, tag: str) -> dict[str, Path]:
    return {
        "weights": run_dir / f"{tag}.safetensors",
        "state": run_dir / f"{tag}.state.safetensors",
        "json": run_dir / f"{tag}.json",
    }


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def save_checkpoint(
    run_dir: str | Path,
    tag: str,
    model: nn.Module,
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    config: dict[str, Any],
    trainer_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rng: bool = True,
) -> None:
    """Write checkpoint ``tag`` of a run (see the module docstring for the files).

    Args:
        run_dir: the run directory (must exist).
        tag: ``"last"``, ``"best"`` or any file-name stem.
        model: the (unwrapped) model.
        model_name, model_kwargs: what :func:`capsnet.models.create` needs to rebuild it.
        config: the resolved run config (``RunConfig.to_dict()``).
        trainer_state: JSON-serialisable progress (epoch, step, metrics, ...).
        optimizer, scheduler: saved when given (needed to resume exactly).
        rng: save the torch random-number generator states with the optimiser.
    """
    run_dir = Path(run_dir)
    paths = _paths(run_dir, tag)
    checkpoint_id = f"{trainer_state.get('step', 0)}-{uuid.uuid4().hex[:12]}"
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": _FORMAT,
        "checkpoint_id": checkpoint_id,
        "model": model_name,
        "model_kwargs": json.dumps(model_kwargs),
        "config": json.dumps(config),
        "epoch": str(trainer_state.get("epoch", "")),
        "step": str(trainer_state.get("step", "")),
    }
    files: dict[str, bytes | str] = {"weights": st_save(weights, metadata=meta)}
    record = {"format": _FORMAT, "checkpoint_id": checkpoint_id, **trainer_state}
    if optimizer is not None:
        tensors: dict[str, torch.Tensor] = {}
        record["optimizer"] = _split_tensors(optimizer.state_dict(), "optimizer", tensors)
        if scheduler is not None:
            record["scheduler"] = _split_tensors(scheduler.state_dict(), "scheduler", tensors)
        if rng:
            record["rng"] = _split_tensors(_rng_state(), "rng", tensors)
        state_meta = {"format": _FORMAT, "checkpoint_id": checkpoint_id}
        files["state"] = st_save(tensors, metadata=state_meta)
    else:
        paths.pop("state")
    record["files"] = sorted(paths[k].name for k in files)
    files["json"] = json.dumps(record, indent=1)
    # All files first, then the renames: a crash before the renames leaves the old
    # checkpoint intact; a crash between them is completed by _consistent_files.
    for key, data in files.items():
        write_flushed(_tmp(paths[key]), data)
    for key in files:
        os.replace(_tmp(paths[key]), paths[key])


def _file_id(path: Path) -> str | None:
    try:
        if path.name.endswith(".json") or path.name.endswith(".json.tmp"):
            return json.loads(path.read_text()).get("checkpoint_id")
        with safe_open(str(path), "pt") as fh:
            return (fh.metadata() or {}).get("checkpoint_id")
    except Exception:  # a torn or foreign file has no usable id
        return None


def _consistent_files(run_dir: Path, tag: str) -> dict[str, Path]:
    paths = _paths(run_dir, tag)
    if not paths["json"].exists() and not _tmp(paths["json"]).exists():
        raise FileNotFoundError(f"no checkpoint {tag!r} in {run_dir} ({tag}.json is missing)")
    json_path = paths["json"] if paths["json"].exists() else _tmp(paths["json"])
    record_files = json.loads(json_path.read_text()).get("files", [])
    wanted = {k: p for k, p in paths.items() if p.name in record_files or k == "json"}
    ids = {k: _file_id(p) for k, p in wanted.items()}
    if len(set(ids.values())) == 1 and None not in ids.values():
        return wanted
    # Roll forward a save interrupted between its renames.
    candidates = {k: _tmp(p) if _tmp(p).exists() else p for k, p in wanted.items()}
    cids = {k: _file_id(p) for k, p in candidates.items()}
    if len(set(cids.values())) == 1 and None not in cids.values():
        for key, path in candidates.items():
            if path != wanted[key]:
                os.replace(path, wanted[key])
        return wanted
    raise RuntimeError(
        f"checkpoint {tag!r} in {run_dir} is inconsistent (files from different saves: "
        f"{ids}); delete its files to start over"
    )


def checkpoint_exists(run_dir: str | Path, tag: str = "last") -> bool:
    """Whether ``run_dir`` holds checkpoint ``tag`` (complete or completable)."""
    paths = _paths(Path(run_dir), tag)
    return paths["json"].exists() or _tmp(paths["json"]).exists()


def load_checkpoint(
    run_dir: str | Path,
    tag: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load checkpoint ``tag`` into ``model`` (and optimiser/scheduler/RNG when given).

    Returns:
        The trainer-state record written by :func:`save_checkpoint`.
    """
    paths = _consistent_files(Path(run_dir), tag)
    record = json.loads(paths["json"].read_text())
    model.load_state_dict(load_file(str(paths["weights"])))
    if optimizer is not None:
        if "state" not in paths:
            raise ValueError(f"checkpoint {tag!r} in {run_dir} has no optimiser state")
        tensors = load_file(str(paths["state"]))
        optimizer.load_state_dict(_join_tensors(record["optimizer"], tensors))
        if scheduler is not None and "scheduler" in record:
            scheduler.load_state_dict(_join_tensors(record["scheduler"], tensors))
        if restore_rng and "rng" in record:
            _set_rng_state(_join_tensors(record["rng"], tensors))
    return record


# ------------------------------------------------------------------ inference loading


def resolve_weights(path: str | Path, which: str = "best") -> Path:
    """The weights file for ``path``: a ``.safetensors`` file or a run directory.

    In a run directory ``which`` (``"best"`` or ``"last"``) is used, falling back to the
    other when it is missing.
    """
    path = Path(path)
    if path.is_dir():
        order = [which, "last" if which == "best" else "best"]
        for tag in order:
            if checkpoint_exists(path, tag):
                return _consistent_files(path, tag)["weights"]
        found = sorted(p.name for p in path.iterdir())[:20]
        raise FileNotFoundError(
            f"{path} holds no checkpoint (expected best.safetensors or last.safetensors); "
            f"found: {found}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"expected a run directory or a .safetensors file, got {str(path)!r}")
    return path


def read_metadata(path: str | Path, which: str = "best") -> dict[str, Any]:
    """Model name, kwargs, run config, epoch and step stored with a checkpoint's weights."""
    file = resolve_weights(path, which)
    try:
        with safe_open(str(file), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for torn files
        raise ValueError(f"{file} is not a readable .safetensors file: {err}") from err
    if meta.get("format") != _FORMAT or "model" not in meta:
        raise ValueError(
            f"{file} is not a capsnet checkpoint (no model name in its metadata); load plain "
            f"weights with safetensors.torch.load_file and model.load_state_dict"
        )
    return {
        "path": str(file),
        "model": meta["model"],
        "model_kwargs": json.loads(meta.get("model_kwargs", "{}")),
        "config": json.loads(meta.get("config", "{}")),
        "epoch": int(meta["epoch"]) if meta.get("epoch", "").isdigit() else None,
        "step": int(meta["step"]) if meta.get("step", "").isdigit() else None,
    }


def load(path: str | Path, *, which: str = "best", device: str | torch.device = "cpu") -> nn.Module:
    """A trained model, ready for inference (``eval()`` mode): the weight-loading core of
    :func:`capsnet.runs.load_run` and :func:`capsnet.load` (which also resolve the device).

    Args:
        path: a run directory or a ``.safetensors`` checkpoint written by capsnet.
        which: in a run directory, ``"best"`` (default; ``"last"`` when there is no best)
            or ``"last"``.
        device: where to put the model.

    Example::

        model = capsnet.load("runs/quickstart")
        scores = model(images).scores  # (B, num_classes)
    """
    check_choice("which", which, ("best", "last"))
    from capsnet import models

    meta = read_metadata(path, which)
    # A checkpoint from before a default changed rebuilds with the old value (registry
    # metadata legacy_kwargs, e.g. matrix_capsnet's EM variant "paper").
    model = models.create(
        meta["model"], **models.restore_kwargs(meta["model"], meta["model_kwargs"])
    )
    model.load_state_dict(load_file(meta["path"]))
    return model.to(device).eval()
