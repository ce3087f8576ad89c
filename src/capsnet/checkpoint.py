"""Checkpoints: safetensors weights, JSON trainer state, atomic writes and :func:`load`.

A checkpoint ``TAG`` (``last``, ``best`` or ``step-N``) in a run directory is

* ``TAG.safetensors``: the model's ``state_dict``; its metadata holds the model name, the
  constructor kwargs and the run config as JSON, so :func:`load` rebuilds the model, and
  ``sha256``, the SHA-256 of the file's tensor bytes.
* ``TAG.json``: epoch, step, metrics and (``last`` only) the optimiser's and scheduler's
  non-tensor state.
* ``TAG.state.safetensors`` (``last`` only): the optimiser's tensors (Adam moments) and the
  random-number generator states (with its ``sha256`` too).

Loading never executes code: weights and tensors come from safetensors, everything else
from JSON. Every load checks each file's length against its header and its tensor bytes
against ``sha256``: a truncated or bit-flipped file is a :class:`CheckpointError` naming
the file (checkpoints written before the checksum existed load without the check).

Every file is written to a temporary name ``.NAME.<checkpoint_id>.tmp`` (unique per save,
so two saves never share one), flushed and renamed into place (other files of a run use
:func:`capsnet.io.atomic_write`, re-exported here). The files of one checkpoint share the
``checkpoint_id``, and a save interrupted between the renames is completed (rolled
forward) on the next load from the temporary files carrying that id, so a killed run
always finds a consistent checkpoint. Only one process saves a run's checkpoints: the
holder of the run directory's lock (:mod:`capsnet.runlock`); while another process holds
it, a load reads an interrupted save in place instead of renaming its files.

``save_checkpoint(..., keep=K)`` keeps the previous K - 1 ``last`` checkpoints as
``step-N`` (hard links, no copies), so a resume can fall back to an older one
(:func:`list_checkpoints`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from capsnet._checks import check_choice
from capsnet.io import RunDirError, atomic_write, os_error, write_flushed

__all__ = [
    "CheckpointError",
    "atomic_write",
    "list_checkpoints",
    "verify_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_exists",
    "read_metadata",
    "resolve_weights",
    "load",
]

_FORMAT = "capsnet-checkpoint-1"
_STEP_TAG = re.compile(r"^step-(\d+)$")
_MAX_HEADER = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint file is truncated or corrupt; the message names the file."""


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


# ------------------------------------------------------------------ files and checksums


def _paths(run_dir: Path, tag: str) -> dict[str, Path]:
    return {
        "weights": run_dir / f"{tag}.safetensors",
        "state": run_dir / f"{tag}.state.safetensors",
        "json": run_dir / f"{tag}.json",
    }


def _tmp(path: Path, checkpoint_id: str) -> Path:
    return path.with_name(f".{path.name}.{checkpoint_id}.tmp")


def _tmps(path: Path) -> dict[str, Path]:
    """The temporary files of ``path`` left by saves, by checkpoint id."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+-[0-9a-f]{{12}})\.tmp$")
    found = {}
    with contextlib.suppress(OSError):
        for p in path.parent.glob(f".{path.name}.*.tmp"):
            m = pattern.match(p.name)
            if m:
                found[m.group(1)] = p
    return found


def _with_checksum(raw: bytes) -> bytes:
    """A serialised safetensors file with ``sha256`` (of its tensor bytes) in its metadata."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    header.setdefault("__metadata__", {})["sha256"] = hashlib.sha256(data).hexdigest()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the tensor bytes to 8
    return len(text).to_bytes(8, "little") + text + data


def _header(path: Path) -> tuple[dict[str, Any], int, int]:
    """``(header, data_start, file_size)`` of a safetensors file, reading only the header.

    Raises:
        CheckpointError: the file is too short for its header or the header is unreadable.
        FileNotFoundError: the file does not exist.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"checkpoint {path} is truncated ({size} bytes, shorter than its "
                    f"header): not a readable .safetensors file"
                )
            raw = fh.read(n)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise os_error(err, path, "read") from err
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError:
        raise CheckpointError(
            f"checkpoint {path} is corrupt (unreadable header): not a readable .safetensors file"
        ) from None
    return header, 8 + n, size


def _data_end(header: dict[str, Any]) -> int:
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    return max(ends, default=0)


def _verified_bytes(path: Path) -> bytes:
    """The bytes of a safetensors file, checked for truncation and (when recorded) checksum."""
    header, start, size = _header(path)
    expected = start + _data_end(header)
    if size < expected:
        raise CheckpointError(f"checkpoint {path} is truncated ({size} of {expected} bytes)")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise os_error(err, path, "read") from err
    if len(raw) != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({len(raw)} bytes where its header says {expected})"
        )
    digest = (header.get("__metadata__") or {}).get("sha256")
    if digest and hashlib.sha256(memoryview(raw)[start:]).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    return raw


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a verified safetensors file (a one-line error when it is damaged)."""
    raw = _verified_bytes(path)
    try:
        return st_load(raw)
    except Exception as err:  # safetensors' own error type for malformed files
        raise CheckpointError(f"checkpoint {path} is corrupt ({err})") from err


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except OSError as err:
        raise os_error(err, path, "read") from err
    except ValueError:
        raise CheckpointError(f"checkpoint {path} is corrupt (unreadable JSON)") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt (not a JSON object)")
    return record


def _file_id(path: Path) -> str | None:
    """The ``checkpoint_id`` of one file (None when it is missing, torn or foreign)."""
    try:
        if path.name.endswith(".json") or ".json." in path.name:
            value = _read_record(path).get("checkpoint_id")
        else:
            value = (_header(path)[0].get("__metadata__") or {}).get("checkpoint_id")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None


def _wanted(paths: dict[str, Path], record: dict[str, Any]) -> dict[str, Path]:
    """The files a checkpoint record says it has (a ``step-N`` copy of ``last`` lists the
    ``last`` names: matched by kind)."""
    names = record.get("files", [])
    has_state = "optimizer" in record or any(n.endswith(".state.safetensors") for n in names)
    return {k: p for k, p in paths.items() if k != "state" or has_state}


# ------------------------------------------------------------------ save


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
    keep: int = 1,
    extra_metadata: dict[str, str] | None = None,
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
        keep: for ``tag="last"``: how many checkpoints to keep, this one included; the
            previous ``last`` becomes ``step-N`` (N its step) and older ``step-N`` beyond
            ``keep - 1`` are deleted.
        extra_metadata: more string entries for the weights file's metadata (the trainer
            stores ``class_names`` and ``preprocessing``, which ``capsnet predict`` reads).

    Raises:
        capsnet.io.RunDirError: a file could not be written (disk full, read-only, ...);
            the previous checkpoint is left intact and no temporary file remains.
    """
    run_dir = Path(run_dir)
    paths = _paths(run_dir, tag)
    checkpoint_id = f"{int(trainer_state.get('step', 0) or 0)}-{uuid.uuid4().hex[:12]}"
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": _FORMAT,
        "checkpoint_id": checkpoint_id,
        "model": model_name,
        "model_kwargs": json.dumps(model_kwargs),
        "config": json.dumps(config),
        "epoch": str(trainer_state.get("epoch", "")),
        "step": str(trainer_state.get("step", "")),
        **(extra_metadata or {}),
    }
    files: dict[str, bytes | str] = {"weights": _with_checksum(st_save(weights, metadata=meta))}
    record = {"format": _FORMAT, "checkpoint_id": checkpoint_id, **trainer_state}
    if optimizer is not None:
        tensors: dict[str, torch.Tensor] = {}
        record["optimizer"] = _split_tensors(optimizer.state_dict(), "optimizer", tensors)
        if scheduler is not None:
            record["scheduler"] = _split_tensors(scheduler.state_dict(), "scheduler", tensors)
        if rng:
            record["rng"] = _split_tensors(_rng_state(), "rng", tensors)
        state_meta = {"format": _FORMAT, "checkpoint_id": checkpoint_id}
        files["state"] = _with_checksum(st_save(tensors, metadata=state_meta))
    else:
        paths.pop("state")
    record["files"] = sorted(paths[k].name for k in files)
    files["json"] = json.dumps(record, indent=1)
    # All files first, then the renames: a crash before the renames leaves the old
    # checkpoint intact; a crash between them is completed by _consistent_files.
    written: list[Path] = []
    try:
        for key, data in files.items():
            written.append(_tmp(paths[key], checkpoint_id))
            try:
                write_flushed(written[-1], data)
            except RunDirError as err:  # name the checkpoint, not its temporary file
                text = str(err).replace(str(written[-1]), str(paths[key]))
                raise RunDirError(text, errno_=err.errno, filename=paths[key]) from err
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    if keep > 1 and tag == "last":
        _keep_previous(run_dir)
    for key in files:
        try:
            os.replace(_tmp(paths[key], checkpoint_id), paths[key])
        except OSError as err:
            raise os_error(err, paths[key]) from err
    _remove_stale_tmps(paths.values())
    if tag == "last":
        for old in list_checkpoints(run_dir)[max(keep, 1) :]:
            _delete(run_dir, old)


def _remove_stale_tmps(paths: Any) -> None:
    for path in paths:
        for tmp in _tmps(path).values():
            with contextlib.suppress(OSError):
                tmp.unlink()


def _keep_previous(run_dir: Path) -> None:
    """Keep the current ``last`` as ``step-N``: hard links (a copy where links fail), the
    JSON last, so a ``step-N`` checkpoint exists only once it is complete."""
    src = _paths(run_dir, "last")
    if not src["json"].exists():
        return
    try:
        record = _read_record(src["json"])
        wanted = _wanted(src, record)
        step = int(record.get("step", -1))
    except (OSError, ValueError, TypeError):
        return
    ids = {_file_id(p) for p in wanted.values()}
    if step < 0 or ids != {record.get("checkpoint_id")}:
        return  # not a complete checkpoint: nothing worth keeping
    dst = _paths(run_dir, f"step-{step}")
    if dst["json"].exists():
        return
    for key in ("weights", "state", "json"):
        if key not in wanted:
            continue
        with contextlib.suppress(FileNotFoundError):
            dst[key].unlink()
        try:
            os.link(wanted[key], dst[key])
        except OSError:
            try:
                shutil.copyfile(wanted[key], dst[key])
            except OSError as err:
                raise os_error(err, dst[key]) from err


def _delete(run_dir: Path, tag: str) -> None:
    paths = _paths(run_dir, tag)
    for key in ("json", "weights", "state"):  # the JSON first: no half checkpoint is listed
        with contextlib.suppress(FileNotFoundError):
            paths[key].unlink()


def list_checkpoints(run_dir: str | Path) -> list[str]:
    """The resumable checkpoints of a run, newest first: ``last``, then ``step-N`` by N."""
    run_dir = Path(run_dir)
    steps = []
    with contextlib.suppress(OSError):
        for p in run_dir.glob("step-*.json"):
            m = _STEP_TAG.match(p.name[: -len(".json")])
            if m:
                steps.append(int(m.group(1)))
    tags = ["last"] if checkpoint_exists(run_dir, "last") else []
    return tags + [f"step-{n}" for n in sorted(steps, reverse=True)]


# ------------------------------------------------------------------ load


def _writer_elsewhere(run_dir: Path) -> bool:
    """Whether another process holds the run directory's lock (then it owns the files)."""
    from capsnet.runlock import is_locked_elsewhere

    return is_locked_elsewhere(run_dir)


def _consistent_files(run_dir: Path, tag: str) -> dict[str, Path]:
    paths = _paths(run_dir, tag)
    json_tmps = _tmps(paths["json"])
    if not paths["json"].exists() and not json_tmps:
        raise FileNotFoundError(f"no checkpoint {tag!r} in {run_dir} ({tag}.json is missing)")
    ids: dict[str, str | None] = {}
    wanted: dict[str, Path] = {}
    if paths["json"].exists():
        record = _read_record(paths["json"])
        wanted = _wanted(paths, record)
        ids = {k: _file_id(p) for k, p in wanted.items()}
        if len(set(ids.values())) == 1 and None not in ids.values():
            return wanted
    # Roll forward a save interrupted between its renames: the newest id with a JSON.
    for cid in sorted(json_tmps, key=lambda c: int(c.split("-")[0]), reverse=True):
        try:
            new_record = _read_record(json_tmps[cid])
        except (OSError, ValueError):
            continue
        new_wanted = _wanted(paths, new_record)
        candidates = {}
        for key, path in new_wanted.items():
            tmp = _tmp(path, cid)
            if tmp.exists() and _file_id(tmp) == cid:
                candidates[key] = tmp
            elif _file_id(path) == cid:
                candidates[key] = path
        if len(candidates) < len(new_wanted):
            continue
        if _writer_elsewhere(run_dir):  # its writer is finishing this save: read in place
            return candidates
        for key, path in candidates.items():
            if path != new_wanted[key]:
                os.replace(path, new_wanted[key])
        return new_wanted
    for key, file_id in ids.items():
        if file_id is None:  # a torn or damaged file, not a mix of saves: name it
            path = wanted[key]
            if not path.exists():
                raise CheckpointError(f"checkpoint {tag!r} in {run_dir}: {path.name} is missing")
            if key == "json":
                _read_record(path)
            else:
                _verified_bytes(path)
            raise CheckpointError(f"checkpoint {path} is corrupt (no checkpoint id)")
    raise RuntimeError(
        f"checkpoint {tag!r} in {run_dir} is inconsistent (files from different saves: "
        f"{ids}); delete its files to start over"
    )


def checkpoint_exists(run_dir: str | Path, tag: str = "last") -> bool:
    """Whether ``run_dir`` holds checkpoint ``tag`` (complete or completable)."""
    paths = _paths(Path(run_dir), tag)
    return paths["json"].exists() or bool(_tmps(paths["json"]))


def verify_checkpoint(run_dir: str | Path, tag: str = "last") -> dict[str, Any]:
    """Check every file of checkpoint ``tag`` (consistency, length, checksum) without
    loading it into a model; returns its record.

    Raises:
        CheckpointError: a file is truncated or corrupt (the message names it).
        RuntimeError: the files come from different saves.
        FileNotFoundError: there is no such checkpoint.
    """
    paths = _consistent_files(Path(run_dir), tag)
    record = _read_record(paths["json"])
    for key in ("weights", "state"):
        if key in paths:
            _verified_bytes(paths[key])
    return record


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

    Every file is verified before anything is loaded, so a damaged checkpoint leaves the
    model and optimiser untouched.

    Returns:
        The trainer-state record written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: a file is truncated or corrupt (the message names it).
    """
    paths = _consistent_files(Path(run_dir), tag)
    record = _read_record(paths["json"])
    weights = _load_tensors(paths["weights"])
    tensors = None
    if optimizer is not None:
        if "state" not in paths:
            raise ValueError(f"checkpoint {tag!r} in {run_dir} has no optimiser state")
        tensors = _load_tensors(paths["state"])
    model.load_state_dict(weights)
    if optimizer is not None and tensors is not None:
        optimizer.load_state_dict(_join_tensors(record["optimizer"], tensors))
        if scheduler is not None and "scheduler" in record:
            scheduler.load_state_dict(_join_tensors(record["scheduler"], tensors))
        if restore_rng and "rng" in record:
            _set_rng_state(_join_tensors(record["rng"], tensors))
    return record


# ------------------------------------------------------------------ inference loading


def resolve_weights(path: str | os.PathLike, which: str = "best") -> Path:
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


def read_metadata(path: str | os.PathLike, which: str = "best") -> dict[str, Any]:
    """Model name, kwargs, run config, epoch and step stored with a checkpoint's weights."""
    file = resolve_weights(path, which)
    meta = _header(file)[0].get("__metadata__") or {}
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
    model.load_state_dict(_load_tensors(Path(meta["path"])))
    return model.to(device).eval()
