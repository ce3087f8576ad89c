"""The ``capsnet`` command (also ``python -m capsnet`` and ``torchrun -m capsnet``).

::

    capsnet train --recipe quickstart --download      # a short real MNIST run
    capsnet train --model capsnet --dataset mnist --epochs 5 --iterations 1
    capsnet train --resume runs/quickstart            # continue a killed run
    capsnet evaluate runs/quickstart                  # error, per-class accuracy, confusion
    capsnet recipes                                   # the papers' settings
    capsnet models / capsnet datasets
    capsnet data generate toynorb --root DIR          # list / download / generate / verify
    capsnet attack runs/quickstart                    # FGSM / BIM sweeps (capsnet.experiment_cli)
    capsnet experiment routing runs/quickstart        # the papers' experiments
    capsnet report runs/quickstart                    # one HTML page with everything

``capsnet train`` flags are the fields of :class:`capsnet.config.RunConfig` (``--lr``,
``--batch-size``, ...); given flags override the recipe, the recipe overrides the defaults.
Model constructor arguments: ``--model-kwarg reconstruction=false`` (repeatable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

from capsnet.config import CHOICES, RunConfig, load_recipe, parse_value

__all__ = ["main", "build_parser"]

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError)


def _kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value.strip())


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(RunConfig)
    group = parser.add_argument_group("run config (RunConfig fields; recipe keys)")
    for f in dataclasses.fields(RunConfig):
        if f.name == "recipe":  # set by --recipe
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else {}
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        if f.name in ("model_kwargs", "data_kwargs"):
            singular = flag[:-1]  # --model-kwarg KEY=VALUE
            group.add_argument(
                singular, dest=f.name, type=_kv, action="append", default=argparse.SUPPRESS,
                metavar="KEY=VALUE", help=f.metadata["help"] + "; repeatable, VALUE as TOML",
            )  # fmt: skip
            continue
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if base[0] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(flag, type=base[0], metavar=f.name.upper(), **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsnet",
        description="Capsule networks: train, evaluate, attack, run experiments, report.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a model (a recipe, flags, or both)", allow_abbrev=False)
    p.add_argument("--recipe", help="recipe name (see `capsnet recipes`) or a .toml file")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config as JSON and exit"
    )
    _add_config_flags(p)

    p = sub.add_parser("evaluate", help="evaluate a run directory or .safetensors checkpoint")
    p.add_argument("checkpoint", help="run directory or .safetensors file")
    p.add_argument("--which", choices=("best", "last"), default="best")
    p.add_argument("--split", help="dataset split (default: the run's eval_split)")
    p.add_argument("--dataset", help="evaluate on another dataset (same classes)")
    p.add_argument("--data-root")
    p.add_argument("--download", action="store_true")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=CHOICES["precision"], default="fp32")
    p.add_argument("--limit-batches", type=int)
    p.add_argument("--output", help="JSON file for the results")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("recipes", help="list the recipes, or print one")
    p.add_argument("name", nargs="?", help="print this recipe's file")
    sub.add_parser("models", help="list the registered models")
    sub.add_parser("datasets", help="list the datasets")

    from capsnet.experiment_cli import register_cli

    register_cli(sub)  # attack, experiment ..., report (each parser sets args.handler)
    from capsnet.data_cli import register_cli as register_data_cli

    register_data_cli(sub)  # data list / download / generate / verify
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"capsnet: error: {message}", file=sys.stderr)
    return code


def resolve_train_config(args: argparse.Namespace) -> tuple[RunConfig, bool]:
    """The run config from ``--recipe``/``--resume`` and the explicit flags."""
    # ``recipe`` is set by --recipe (``args.recipe`` is None without it), not a flag.
    names = {f.name for f in dataclasses.fields(RunConfig)} - {"recipe"}
    given = {k: v for k, v in vars(args).items() if k in names}
    for key in ("model_kwargs", "data_kwargs"):
        if key in given:
            given[key] = dict(given[key])
    if args.resume:
        if args.recipe:
            raise ValueError("--resume uses the run's saved config; drop --recipe")
        from capsnet.train import resume_config

        return resume_config(args.resume, **given), True
    if args.recipe:
        return load_recipe(args.recipe, **given), False
    return RunConfig(**given), False


def _train(args: argparse.Namespace) -> int:
    from capsnet import distributed
    from capsnet.train import Trainer

    try:
        cfg, resume = resolve_train_config(args)
    except _USER_ERRORS as err:
        return _fail(str(err), 2)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    try:
        ctx = distributed.setup(cfg.dist_backend, cfg.device, cfg.dist_timeout)
    except _USER_ERRORS as err:
        return _fail(str(err))
    try:
        try:
            trainer = Trainer(cfg, ctx, resume=resume)
        except _USER_ERRORS as err:
            if os.environ.get("CAPSNET_TRACEBACK"):
                raise
            return _fail(f"{err}\n(set CAPSNET_TRACEBACK=1 for the traceback)")
        try:
            trainer.fit()
        except KeyboardInterrupt:
            if ctx.is_main:
                print(
                    f"\ninterrupted; continue with: capsnet train --resume {trainer.run_dir}",
                    file=sys.stderr,
                )
            return 130
    finally:
        distributed.cleanup(ctx)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from capsnet.evaluate import evaluate_checkpoint

    try:
        result, path = evaluate_checkpoint(
            args.checkpoint, which=args.which, split=args.split, dataset=args.dataset,
            data_root=args.data_root, download=args.download, batch_size=args.batch_size,
            device=args.device, precision=args.precision, limit_batches=args.limit_batches,
            output=args.output, progress=not args.no_progress,
        )  # fmt: skip
    except _USER_ERRORS as err:
        if os.environ.get("CAPSNET_TRACEBACK"):
            raise
        return _fail(str(err))
    print(result.summary())
    print(f"results written to {path}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from capsnet.config import list_recipes, recipe_path

    if args.name:
        try:
            print(recipe_path(args.name).read_text(), end="")
        except (ValueError, FileNotFoundError) as err:
            return _fail(str(err))
        return 0
    recipes = list_recipes()
    width = max((len(r.name) for r in recipes), default=4)
    for r in recipes:
        print(f"{r.name.ljust(width)}  {r.description}")
    print("\nrun one: capsnet train --recipe NAME   (show it: capsnet recipes NAME)")
    return 0


def _models(_: argparse.Namespace) -> int:
    from capsnet.models import list_models, model_info

    names = list_models()
    width = max(len(n) for n in names)
    for name in names:
        info = model_info(name)
        params = f"{info.expected_params:,}" if info.expected_params else "?"
        print(f"{name.ljust(width)}  {info.loss:13s} {params:>11s} params  {info.description}")
    return 0


def _datasets(_: argparse.Namespace) -> int:
    from capsnet.data import dataset_info, list_datasets

    names = list_datasets()
    width = max(len(n) for n in names) + 5
    for name in names:
        info = dataset_info(name)
        label = f"{name}:PATH" if name in ("folder", "npz") else name
        print(f"{label.ljust(width)}  {info.description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``capsnet`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    handlers = {
        "train": _train,
        "evaluate": _evaluate,
        "recipes": _recipes,
        "models": _models,
        "datasets": _datasets,
    }
    handler = handlers.get(args.command) or args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
