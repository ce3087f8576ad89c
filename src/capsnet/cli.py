"""The ``capsnet`` command (also ``python -m capsnet`` and ``torchrun -m capsnet``).

::

    capsnet train --recipe quickstart --download      # a short real MNIST run
    capsnet train --model capsnet --dataset mnist --epochs 5 --iterations 1
    capsnet train --resume runs/quickstart            # continue a killed run
    capsnet evaluate runs/quickstart                  # error, per-class accuracy, confusion
    capsnet recipes                                   # the papers' settings
    capsnet models / capsnet datasets
    capsnet data generate toynorb --root DIR          # list / download / generate / verify
    capsnet experiment attack runs/quickstart         # FGSM / BIM sweeps (capsnet.experiment_cli)
    capsnet experiment routing runs/quickstart        # the papers' experiments
    capsnet report runs/quickstart                    # one HTML page with everything
    capsnet predict runs/quickstart digit.png         # classify image files
    capsnet --version

``capsnet train`` flags are the fields of :class:`capsnet.config.RunConfig` (``--lr``,
``--batch-size``, ...); given flags override the recipe, the recipe overrides the defaults.
Model constructor arguments: ``--model-kwarg reconstruction=false`` (repeatable).

Output flags: ``--output-dir DIR`` where a command writes a folder (``train``,
``experiment ...``), ``--output FILE`` where it writes one file (``evaluate``, ``report``).
``capsnet attack`` is the former name of ``capsnet experiment attack``.
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

from capsnet._cli_common import (
    USER_ERRORS,
    CapsnetParser,
    VersionAction,
    fail,
    key_value,
    thread_count,
)
from capsnet.config import CHOICES, RunConfig, load_recipe

__all__ = ["main", "build_parser"]


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
                singular, dest=f.name, type=key_value, action="append", default=argparse.SUPPRESS,
                metavar="KEY=VALUE", help=f.metadata["help"] + "; repeatable, VALUE as TOML",
            )  # fmt: skip
            continue
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if base[0] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "num_threads":
            group.add_argument(flag, type=thread_count, metavar="N", **kw)
        elif "choices" in kw:
            group.add_argument(flag, type=base[0], **kw)
        else:
            group.add_argument(flag, type=base[0], metavar=f.name.upper(), **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = CapsnetParser(
        prog="capsnet",
        description="Capsule networks: train, evaluate, run experiments (attacks included), "
        "report, predict. Output flags: --output-dir DIR for commands that write a folder, "
        "--output FILE for those that write one file.",
    )
    parser.add_argument("--version", action=VersionAction)
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
    p.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint")
    p.add_argument("--split", help="dataset split (default: the run's eval_split)")
    p.add_argument("--dataset", help="evaluate on another dataset with the same classes")
    p.add_argument("--data-root", help="data folder (default: the run's)")
    p.add_argument("--download", action="store_true", help="download missing data")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--precision", choices=CHOICES["precision"], default="fp32", help="fp32, or bf16 autocast"
    )
    p.add_argument("--limit-batches", type=int, help="evaluate at most N batches")
    p.add_argument(
        "--output",
        metavar="FILE",
        help="JSON file for the results (default: RUN_DIR/evaluation_<which>_<split>.json)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "predict",
        help="classify image files with a trained run",
        description="Classify PNG/JPEG/... files (or every image in a folder) with a trained "
        "run: the images are converted to the run's channels and size and preprocessed as "
        "its dataset's test images; prints the top-k classes and scores per image.",
    )
    p.add_argument("run", metavar="RUN_DIR", help="run directory or .safetensors checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--data-root", help="data folder for the run's dataset, if needed")

    p = sub.add_parser("recipes", help="list the recipes, or print one")
    p.add_argument("name", nargs="?", help="print this recipe's file")
    sub.add_parser("models", help="list the registered models")
    sub.add_parser("datasets", help="list the datasets")

    from capsnet.experiment_cli import register_cli

    register_cli(sub)  # experiment ..., report, attack (each parser sets args.handler)
    from capsnet.data_cli import register_cli as register_data_cli

    register_data_cli(sub)  # data list / download / generate / verify
    return parser


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
    from capsnet.checkpoint import list_checkpoints
    from capsnet.train import Trainer, TrainingInterrupted

    try:
        cfg, resume = resolve_train_config(args)
    except USER_ERRORS as err:
        return fail(str(err), 2)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    try:
        ctx = distributed.setup(cfg.dist_backend, cfg.device, cfg.dist_timeout)
    except USER_ERRORS as err:
        return fail(str(err))
    trainer = None
    try:
        trainer = Trainer(cfg, ctx, resume=resume)
        trainer.fit()
    except TrainingInterrupted as stop:  # SIGTERM / SIGINT: the trainer saved and said how
        return int(stop.code) if isinstance(stop.code, int) else 130
    except KeyboardInterrupt:  # during setup, before the trainer's handlers are in place
        if ctx.is_main:
            run_dir = getattr(trainer, "run_dir", None)
            if run_dir is not None and list_checkpoints(run_dir):
                print(f"\ninterrupted; continue with: capsnet train --resume {run_dir}",
                      file=sys.stderr)  # fmt: skip
            else:
                print("\ninterrupted before the first checkpoint: nothing to resume",
                      file=sys.stderr)  # fmt: skip
        return 130
    except USER_ERRORS as err:  # bad config, NaN stop, full disk, corrupt checkpoint, ...
        if os.environ.get("CAPSNET_TRACEBACK"):
            raise
        return fail(f"{err}\n(set CAPSNET_TRACEBACK=1 for the traceback)")
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
    except USER_ERRORS as err:
        if os.environ.get("CAPSNET_TRACEBACK"):
            raise
        return fail(str(err))
    print(result.summary())
    print(f"results written to {path}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from capsnet.config import list_recipes, recipe_path

    if args.name:
        try:
            print(recipe_path(args.name).read_text(), end="")
        except (ValueError, FileNotFoundError) as err:
            return fail(str(err))
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


def _predict(args: argparse.Namespace) -> int:
    from capsnet.predict import predict_files

    try:
        results = predict_files(
            args.run, args.images, top_k=args.top_k, which=args.which, device=args.device,
            batch_size=args.batch_size, data_root=args.data_root,
        )  # fmt: skip
    except USER_ERRORS as err:
        if os.environ.get("CAPSNET_TRACEBACK"):
            raise
        return fail(str(err))
    for result in results:
        print(json.dumps(result) if args.json else _prediction_line(result))
    return 0


def _prediction_line(result: dict[str, Any]) -> str:
    top = "  ".join(f"{p['class']} {p['score']:.4g}" for p in result["top"])
    return f"{result['file']}: {top}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``capsnet`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    handlers = {
        "train": _train,
        "evaluate": _evaluate,
        "predict": _predict,
        "recipes": _recipes,
        "models": _models,
        "datasets": _datasets,
    }
    handler = handlers.get(args.command) or args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
