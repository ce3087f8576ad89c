"""The run configuration (one dataclass) and the recipes that fill it.

A run is described by :class:`RunConfig`. The command line maps its flags onto the fields
(``--batch-size`` -> ``batch_size``), a recipe is a TOML file whose keys are exactly the
field names (model constructor arguments in a ``[model_kwargs]`` table, dataset arguments
in ``[data_kwargs]``), and the resolved config is saved with every run as ``config.json``.
Unknown keys and bad values are errors that list what is accepted.

>>> from capsnet.config import RunConfig, load_recipe
>>> cfg = load_recipe("quickstart")                       # a shipped recipe
>>> cfg = RunConfig(model="capsnet", dataset="mnist", epochs=2, iterations=1)
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "RunConfig",
    "CHOICES",
    "RecipeInfo",
    "list_recipes",
    "load_recipe",
    "recipe_path",
    "config_from_dict",
    "parse_value",
    "parse_bool",
    "model_parameters",
    "model_annotations",
    "MAX_THREADS",
]

CHOICES: dict[str, tuple[str, ...]] = {
    "loss": ("auto", "margin", "spread", "cross_entropy"),
    "optimizer": ("adam", "adamw", "sgd"),
    "lr_schedule": ("constant", "exponential", "cosine"),
    "precision": ("fp32", "bf16"),
    "dist_backend": ("auto", "gloo", "nccl"),
    "val_split": ("images", "instances"),
}
"""Valid values of the string options (``device`` is checked by pattern)."""

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MAX_THREADS = 1024
"""The largest ``num_threads`` accepted (torch aborts on absurd thread counts)."""
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")
# Set by the dataset, never by the user: the trainer passes what the data provides.
_DATA_DEFINED = ("num_classes", "in_channels", "input_size")


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - dataclass field helper
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    """Everything that defines a training run. Field names are the recipe keys and, with
    ``-`` for ``_``, the ``capsnet train`` flags.

    The defaults are Sabour et al.'s MNIST setting (Adam 1e-3, decay 0.96 every 2000 steps,
    batch 128, 2 px random shifts); recipes override them. Instances validate themselves:
    a bad value raises ``ValueError``/``TypeError`` naming the field and the valid values.
    """

    # ---------------------------------------------------------------- what to train
    model: str = _f("capsnet", "registered model name (see `capsnet models`)")
    model_kwargs: dict[str, Any] = _f({}, "model constructor arguments ([model_kwargs] table)")
    iterations: int | None = _f(None, "routing iterations (capsule models; None: model default)")
    dataset: str = _f("mnist", "dataset name (see `capsnet datasets`)")
    data_kwargs: dict[str, Any] = _f({}, "dataset arguments ([data_kwargs] table)")
    data_root: str | None = _f(None, "data folder (default: $CAPSNET_DATA or ~/.cache/capsnet)")
    download: bool = _f(False, "download missing dataset files")
    train_samples: int | None = _f(None, "train on a fixed random subset of this many images")
    val_samples: int | None = _f(
        None,
        "training images held out as the validation split, which picks the best checkpoint "
        "(and matches models in the experiments); None: a tenth of the training images, at most "
        "5000; 0: no validation split, so the best checkpoint is chosen on eval_split (the "
        "test set: say so when you report it)",
    )
    val_seed: int | None = _f(
        0,
        "seed of the validation subset, the same for every training seed (None: the "
        "training seed, as runs made before this option)",
    )
    val_split: str = _f(
        "images",
        "what the validation split holds out: 'images', a random subset of the training "
        "images; 'instances', whole objects (one training instance per class, drawn with "
        "val_seed; NORB-style data with an instance id per image), so that validation "
        "error predicts the error on the test set's unseen instances (val_samples then "
        "caps how many of their images are kept; None: all)",
    )
    val_instances: int = _f(
        1,
        "objects per class held out by val_split 'instances' (each class keeps at least "
        "one for training); more objects make the validation error a steadier estimate "
        "of the error on unseen objects, at the cost of training objects",
    )
    eval_split: str = _f("test", "split evaluated after each epoch and at the end")
    augment: bool = _f(True, "the dataset's training augmentation (e.g. random shifts)")
    # ---------------------------------------------------------------- objective
    loss: str = _f("auto", "training loss; auto: the model's paper loss")
    reconstruction_weight: float = _f(0.0005, "weight of the reconstruction loss (margin loss)")
    margin_start: float = _f(0.2, "spread-loss margin at epoch 0")
    margin_stop: float = _f(0.9, "final spread-loss margin")
    margin_per_epoch: float = _f(0.1, "spread-loss margin increase per epoch")
    margin_updates_per_epoch: int = _f(
        1,
        "times per epoch the spread-loss margin grows, each by margin_per_epoch / N (1: at "
        "each epoch's start; more for short runs, e.g. 4 on a one-epoch budget)",
    )
    # ---------------------------------------------------------------- optimisation
    epochs: int = _f(10, "number of epochs")
    max_minutes: float | None = _f(
        None,
        "end the run after N minutes of training steps (evaluation not counted): a final "
        "evaluation, then done; --resume with a larger value continues",
    )
    batch_size: int = _f(128, "global batch size (split over distributed ranks)")
    eval_batch_size: int = _f(256, "evaluation batch size")
    optimizer: str = _f("adam", "optimiser")
    lr: float = _f(1e-3, "learning rate")
    weight_decay: float = _f(0.0, "L2 weight decay (added to the gradient, like TF's L2 loss)")
    momentum: float = _f(0.9, "SGD momentum")
    lr_schedule: str = _f("exponential", "learning-rate schedule")
    lr_decay_rate: float = _f(0.96, "exponential decay: factor per lr_decay_steps")
    lr_decay_steps: int = _f(2000, "exponential decay: steps per factor")
    lr_staircase: bool = _f(False, "exponential decay in whole steps of lr_decay_steps")
    grad_clip: float | None = _f(None, "clip the gradient norm to this value")
    # ---------------------------------------------------------------- hardware, reproducibility
    seed: int = _f(0, "random seed (model init, shuffling, augmentation)")
    device: str = _f("auto", "auto (CUDA when present), cpu, cuda, cuda:N or mps")
    precision: str = _f("fp32", "fp32, or bf16 autocast")
    num_threads: int | None = _f(None, "CPU threads for torch (None: chosen from the load)")
    dist_backend: str = _f("auto", "torch.distributed backend: auto (nccl on CUDA, else gloo)")
    dist_timeout: float = _f(300.0, "seconds to wait for all distributed ranks to join")
    # ---------------------------------------------------------------- run directory, logging
    output_dir: str | None = _f(None, "run directory (default: runs/<model>-<dataset>-<time>)")
    checkpoint_every: int = _f(500, "also save the last checkpoint every N steps (0: per epoch)")
    snapshots_per_epoch: int = _f(
        0, "also keep N weight snapshots per epoch (snapshot-STEP), e.g. 4 for quarter epochs"
    )
    keep_checkpoints: int = _f(
        2, "checkpoints kept for resume: last plus the previous N-1 as step-N"
    )
    skip_nonfinite_steps: int = _f(
        0, "skip up to N steps whose loss or gradient is NaN/inf instead of stopping"
    )
    eval_every: int = _f(1, "evaluate every N epochs (and always after the last)")
    log_every: int = _f(50, "write train metrics every N steps")
    limit_train_batches: int | None = _f(None, "smoke test: at most N train batches per epoch")
    limit_eval_batches: int | None = _f(None, "smoke test: at most N evaluation batches")
    progress: bool = _f(True, "show progress bars")
    tensorboard: bool = _f(True, "also log to TensorBoard when it is installed")
    plot: bool = _f(True, "write curves.png (loss and accuracy) at the end")
    recipe: str | None = _f(None, "recipe this config came from (informational)")
    description: str = _f("", "one line describing the run (recipes: the paper result)")

    def __post_init__(self) -> None:
        _coerce_bools(self)
        _check_types(self)
        _check_values(self)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON/TOML-compatible values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> RunConfig:
        """Build from a mapping of field names; unknown keys are a ``ValueError``."""
        return config_from_dict(values, source=source)

    def model_arguments(self) -> dict[str, Any]:
        """Model constructor arguments from ``model_kwargs`` and ``iterations``."""
        kwargs = dict(self.model_kwargs)
        if self.iterations is not None:
            kwargs["iterations"] = self.iterations
        return kwargs


def field_names() -> list[str]:
    """The names of the :class:`RunConfig` fields, in order."""
    return [f.name for f in dataclasses.fields(RunConfig)]


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> RunConfig:
    """:class:`RunConfig` from a mapping; ``source`` names it in error messages."""
    if not isinstance(values, dict):
        raise TypeError(f"{source}: expected a table of run-config keys, got {type(values)}")
    names = field_names()
    unknown = [k for k in values if k not in names]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{source}: unknown key(s) {', '.join(hints)}. Valid keys: {', '.join(names)}"
        )
    return RunConfig(**values)


# ------------------------------------------------------------------------ validation


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is not None and typing.get_origin(hint) is not dict:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is dict:
        return "a table"
    return "None" if hint is type(None) else hint.__name__


def parse_bool(key: str, value: Any) -> bool:
    """A strict boolean: ``True``/``False``, 1/0, or (any case) ``"true"``/``"yes"``/``"1"``
    and ``"false"``/``"no"``/``"0"``; anything else is a ``ValueError`` naming ``key``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"{key} must be a boolean (true/false, yes/no, 1/0), got {value!r}")


def _is_bool_hint(hint: Any) -> bool:
    if hint is bool:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [h for h in typing.get_args(hint) if h is not type(None)]
        return args == [bool]
    return False


def _coerce_bools(cfg: RunConfig) -> None:
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _is_bool_hint(hints[f.name]) and value is not None and not isinstance(value, bool):
            setattr(cfg, f.name, parse_bool(f.name, value))


def _check_types(cfg: RunConfig) -> None:
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _type_ok(value, hints[f.name]):
            raise TypeError(
                f"{f.name} must be {_type_name(hints[f.name])}, "
                f"got {value!r} ({type(value).__name__})"
            )
        if hints[f.name] is float or hints[f.name] == float | None:
            if isinstance(value, int):
                setattr(cfg, f.name, float(value))
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")


def _check_values(cfg: RunConfig) -> None:
    for name, valid in CHOICES.items():
        if getattr(cfg, name) not in valid:
            raise ValueError(f"{name} must be one of {valid}, got {getattr(cfg, name)!r}")
    if not _DEVICE.match(cfg.device):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    positive = ["epochs", "batch_size", "eval_batch_size", "lr_decay_steps", "eval_every"]
    positive += ["log_every", "iterations", "train_samples", "num_threads"]
    positive += ["limit_train_batches", "limit_eval_batches", "keep_checkpoints"]
    positive += ["val_instances", "margin_updates_per_epoch"]
    for name in positive:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name in (
        "val_samples", "val_seed", "checkpoint_every", "seed", "weight_decay", "momentum",
        "skip_nonfinite_steps", "snapshots_per_epoch",
    ):  # fmt: skip
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.num_threads is not None and cfg.num_threads > MAX_THREADS:
        raise ValueError(f"num_threads must be in 1..{MAX_THREADS}, got {cfg.num_threads}")
    if not cfg.momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {cfg.momentum}")
    for name in ("lr", "dist_timeout"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if not cfg.reconstruction_weight >= 0:
        raise ValueError(f"reconstruction_weight must be >= 0, got {cfg.reconstruction_weight}")
    if not 0 < cfg.lr_decay_rate <= 1:
        raise ValueError(f"lr_decay_rate must be in (0, 1], got {cfg.lr_decay_rate}")
    if cfg.max_minutes is not None and not 0 < cfg.max_minutes < float("inf"):
        raise ValueError(f"max_minutes must be a finite number > 0 or None, got {cfg.max_minutes}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {cfg.grad_clip}")
    if not 0 <= cfg.margin_start <= cfg.margin_stop <= 1:
        raise ValueError(
            f"spread-loss margins must satisfy 0 <= margin_start <= margin_stop <= 1, got "
            f"{cfg.margin_start} and {cfg.margin_stop}"
        )
    if cfg.margin_per_epoch < 0:
        raise ValueError(f"margin_per_epoch must be >= 0, got {cfg.margin_per_epoch}")
    if cfg.val_split == "instances" and cfg.val_samples == 0:
        raise ValueError(
            "val_split 'instances' holds out whole objects as the validation split; it "
            "cannot go with val_samples 0 (no validation split): leave val_samples unset"
        )
    if cfg.val_instances != 1 and cfg.val_split != "instances":
        raise ValueError(
            f"val_instances ({cfg.val_instances}) counts the objects held out by val_split "
            f"'instances'; val_split is {cfg.val_split!r}"
        )
    if cfg.val_samples and cfg.train_samples and cfg.val_samples >= cfg.train_samples:
        raise ValueError(
            f"val_samples ({cfg.val_samples}) must be smaller than train_samples "
            f"({cfg.train_samples})"
        )
    _check_model(cfg)
    _check_dataset(cfg)


def model_parameters(name: str) -> dict[str, inspect.Parameter] | None:
    """Constructor parameters of a registered model (None when they cannot be read).

    Factories are ``def name(**kwargs) -> ModelClass``; the class named by the return
    annotation holds the real signature.
    """
    from capsnet.models import model_info

    factory = model_info(name).factory
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(params)
    try:
        cls = typing.get_type_hints(factory).get("return")
    except Exception:  # noqa: BLE001 - unresolvable annotation: no signature to check
        return None
    if not inspect.isclass(cls):
        return None
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {k: p for k, p in params.items() if k != "self"}


def _constructor(name: str) -> Any:
    """The callable whose signature describes a model's arguments (class or factory)."""
    from capsnet.models import model_info

    factory = model_info(name).factory
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory
    try:
        cls = typing.get_type_hints(factory).get("return")
    except Exception:  # noqa: BLE001 - unresolvable annotation
        return None
    return cls.__init__ if inspect.isclass(cls) else None


def model_annotations(name: str) -> dict[str, Any]:
    """Resolved type annotations of a registered model's constructor arguments (``{}``
    when they cannot be resolved)."""
    fn = _constructor(name)
    if fn is None:
        return {}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotation: nothing to check
        return {}
    hints.pop("return", None)
    return hints


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits ``hint``; None when the hint is not one we can check."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, h) for h in typing.get_args(hint)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint in (bool, int, float, str):
        return _type_ok(value, hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    seq = (list, tuple, collections.abc.Sequence)
    if hint in seq or origin in seq:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(args) == 1:
            results = [_matches(v, args[0]) for v in value]
            return None if None in results else all(results)
        return True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return None


def _hint_text(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_hint_text(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _check_model_kwarg_types(cfg: RunConfig) -> None:
    hints = model_annotations(cfg.model)
    kwargs = dict(cfg.model_kwargs)
    for key, value in kwargs.items():
        hint = hints.get(key)
        if hint is None:
            continue
        if _is_bool_hint(hint) and value is not None and not isinstance(value, bool):
            kwargs[key] = value = parse_bool(f"model_kwargs.{key}", value)
        if _matches(value, hint) is False:
            raise TypeError(
                f"model_kwargs.{key}: {cfg.model!r} expects {_hint_text(hint)}, "
                f"got {value!r} ({type(value).__name__})"
            )
    cfg.model_kwargs = kwargs


def _check_model(cfg: RunConfig) -> None:
    from capsnet.models import model_info

    info = model_info(cfg.model)  # ValueError listing the registered models
    cfg.model = info.name
    params = model_parameters(info.name)
    for key in cfg.model_kwargs:
        if key in _DATA_DEFINED:
            raise ValueError(
                f"model_kwargs: {key!r} is set from the dataset; choose the dataset "
                f"(or data_kwargs) instead"
            )
        if key in ("device", "dtype"):
            raise ValueError(f"model_kwargs: {key!r} is chosen by the trainer (use `device`)")
        if params is not None and key not in params:
            valid = [k for k in params if k not in (*_DATA_DEFINED, "device", "dtype")]
            raise ValueError(
                f"model_kwargs: {cfg.model!r} has no argument {key!r}. "
                f"Valid arguments: {', '.join(valid)}"
            )
    if cfg.iterations is not None:
        if "iterations" in cfg.model_kwargs:
            raise ValueError("give routing iterations once: `iterations` or model_kwargs")
        if params is not None and "iterations" not in params:
            raise ValueError(
                f"iterations: model {cfg.model!r} has no routing iterations (it is not a "
                f"capsule model); leave iterations unset"
            )
    _check_model_kwarg_types(cfg)


def _check_dataset(cfg: RunConfig) -> None:
    try:
        from capsnet.data import dataset_info
    except ImportError:  # the data package is optional at config time
        return
    info = dataset_info(cfg.dataset)  # ValueError listing the registered datasets
    if info.splits and cfg.eval_split not in info.splits:
        raise ValueError(
            f"eval_split {cfg.eval_split!r} is not a split of {cfg.dataset!r}; valid: "
            f"{', '.join(info.splits)}"
        )
    if info.splits and "train" not in info.splits:
        raise ValueError(f"dataset {cfg.dataset!r} has no 'train' split to train on")
    params = inspect.signature(info.factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [k for k in params if k not in ("split", "root", "download")] + ["limit"]
        for key in cfg.data_kwargs:
            if key not in valid:
                raise ValueError(
                    f"data_kwargs: dataset {info.name!r} has no option {key!r}. "
                    f"Valid options: {', '.join(valid)}"
                )


# ------------------------------------------------------------------------ parsing


def parse_value(text: str) -> Any:
    """A command-line value as TOML (``3``, ``true``, ``[1, 2]``, ``"x"``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# ------------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class RecipeInfo:
    """A shipped recipe: its name, one-line description and file."""

    name: str
    description: str
    path: Path


def _recipe_dir() -> Path:
    return Path(str(resources.files("capsnet") / "recipes"))


def list_recipes() -> list[RecipeInfo]:
    """The recipes shipped in ``capsnet/recipes``, sorted by name."""
    out = []
    for path in sorted(_recipe_dir().glob("*.toml")):
        with path.open("rb") as fh:
            values = tomllib.load(fh)
        out.append(RecipeInfo(path.stem, str(values.get("description", "")), path))
    return out


def recipe_path(name: str) -> Path:
    """The file of a shipped recipe, or ``name`` itself when it is a ``.toml`` path."""
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {name!r} does not exist")
        return path
    path = _recipe_dir() / f"{name}.toml"
    if not path.is_file():
        valid = [r.name for r in list_recipes()]
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown recipe {name!r}.{hint} Available recipes: {', '.join(valid)}")
    return path


def load_recipe(name: str, **overrides: Any) -> RunConfig:
    """The :class:`RunConfig` of a recipe (a shipped name or a ``.toml`` path).

    ``overrides`` replace recipe values (the command line's explicit flags); the
    ``model_kwargs`` and ``data_kwargs`` tables are merged key by key.
    """
    path = recipe_path(name)
    with path.open("rb") as fh:
        try:
            values = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"recipe {path}: invalid TOML: {err}") from err
    values.setdefault("recipe", path.stem)
    config_from_dict(values, source=f"recipe {path.name}")  # the recipe alone must be valid
    for key in ("model_kwargs", "data_kwargs"):
        if key in overrides:
            overrides = {**overrides, key: {**values.get(key, {}), **overrides[key]}}
    values.update(overrides)
    return config_from_dict(values, source=f"recipe {path.name} with overrides")
