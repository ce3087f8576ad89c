"""``capsnet experiment ...`` and ``capsnet report``: the command line front of
:mod:`capsnet.experiments` and :mod:`capsnet.report` (``capsnet attack`` is the former name
of ``capsnet experiment attack`` and still works).

:func:`register_cli` adds the subcommands to the ``capsnet`` parser; each parser carries
its handler as ``args.handler`` (a function ``args -> exit status``), also listed in
:data:`HANDLERS` by command name.

Models are given as run directories (or ``.safetensors`` checkpoints) written by
``capsnet train``; the test data is the run's own dataset (``--dataset`` / ``--split``
override it). Results go to ``<RUN_DIR>/experiments/<experiment>/`` unless ``--output-dir``
says otherwise, where ``capsnet report RUN_DIR`` finds them (output flags: see
:mod:`capsnet._cli_common`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from capsnet._cli_common import (
    USER_ERRORS,
    CapsnetParser,
    add_output_dir,
    fail,
    format_table,
    key_value,
    thread_count,
)
from capsnet.runs import Run, load_run, run_dataset

__all__ = ["register_cli", "main", "HANDLERS", "LoadedRun", "load_run", "run_dataset"]


# The former homes of these; capsnet.runs is the one place that loads a run.
LoadedRun = Run


def _unique_labels(runs: Sequence[Run]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.name} ({r.run_dir.name})"


# --------------------------------------------------------------------------- parsers


class _Floats(argparse.Action):
    """A list of numbers: ``--values -10 0 10`` or ``--values 0,0.1,0.2`` (or both)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        numbers = []
        for text in values:
            for item in str(text).replace(",", " ").split():
                try:
                    numbers.append(float(item))
                except ValueError:
                    parser.error(f"{option_string}: expected numbers, got {item!r}")
        setattr(namespace, self.dest, numbers)


def _common(p: argparse.ArgumentParser, *, baseline: bool, seeds: bool = False) -> None:
    if seeds:  # several runs per model, one per training seed (or --matched)
        p.add_argument(
            "run",
            metavar="RUN_DIR",
            nargs="*",
            help="run directory or .safetensors checkpoint; several: one per training seed",
        )
    else:
        p.add_argument("run", metavar="RUN_DIR", help="run directory or .safetensors checkpoint")
    if baseline:
        p.add_argument(
            "--baseline",
            metavar="RUN_DIR",
            action="append",
            nargs="+" if seeds else None,
            default=[],
            help="a model to compare with (e.g. the baseline CNN); repeatable"
            + ("; one run per seed, as many as RUN_DIR" if seeds else ""),
        )
    p.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint")
    p.add_argument("--dataset", help="test on another dataset (default: the run's)")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--data-root", help="data folder (default: the run's)")
    p.add_argument("--download", action="store_true", help="download missing data")
    add_output_dir(p, "output folder (default: RUN_DIR/experiments/<experiment>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=100, help="evaluation batch size")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _threads_flag(p)


def _threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--num-threads",
        type=thread_count,
        metavar="N",
        help="CPU threads for torch, 1..1024 (default: torch's default)",
    )


def _protocol_flags(p: argparse.ArgumentParser, recipe: str, baseline: str) -> None:
    p.add_argument("--recipe", default=recipe, help=f"capsule model recipe (default {recipe})")
    p.add_argument("--baseline-recipe", default=baseline, help=f"CNN recipe (default {baseline})")
    p.add_argument("--epochs", type=int, help="epochs per model (default: the recipes')")
    p.add_argument(
        "--target-error",
        type=float,
        help="familiar error to match (default: the best level both models reach)",
    )
    p.add_argument(
        "--set",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config value for both models (TOML value); repeatable",
    )
    for who, name in (("capsule", "capsule model"), ("baseline", "CNN")):
        p.add_argument(
            f"--{who}-set",
            type=key_value,
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"run-config value for the {name} only, after --set (e.g. epochs=4 "
            "or lr=3e-4); repeatable",
        )
    p.add_argument(
        "--model-kwarg",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="capsule model constructor argument; repeatable",
    )
    p.add_argument(
        "--baseline-model-kwarg",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CNN constructor argument; repeatable",
    )
    p.add_argument("--data-root", help="data folder")
    p.add_argument(
        "--download",
        action="store_true",
        help="download missing data (same as --set download=true)",
    )
    p.add_argument("--seeds", type=int, default=3, help="training seeds per model (0, 1, ..., N-1)")
    p.add_argument(
        "--snapshots-per-epoch",
        type=int,
        default=4,
        help="weight snapshots per epoch the matching chooses from (4: quarter epochs)",
    )
    p.add_argument(
        "--smooth",
        type=int,
        metavar="N",
        help="match on running means of the validation curves over N snapshots (odd; 1: the "
        "raw curves; default: 3 for viewpoint, 1 for affnist-protocol)",
    )
    p.add_argument(
        "--val-per-seed",
        action=argparse.BooleanOptionalAction,
        help="each training seed holds out its own validation data (default: yes for "
        "viewpoint, whose validation is one object per class; no for affnist-protocol)",
    )
    p.add_argument(
        "--max-examples",
        type=int,
        default=0,
        help="test examples per test set, a seeded random subset (0: all)",
    )
    add_output_dir(p, "output folder (default: runs/experiments/<experiment>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=250, help="novel evaluation batch size")
    _threads_flag(p)


_ATTACK_DESCRIPTION = (
    "Adversarial robustness: FGSM and BIM, untargeted and targeted, over a sweep of L-inf "
    "budgets on the test set. Gradients flow through routing. Every rate gets a 95 %% "
    "bootstrap interval; each --baseline is compared with the model on the same images "
    "(paired interval, McNemar). Several runs per model (one per training seed) pool the "
    "seeds: capsnet experiment attack runs/caps-0 runs/caps-1 runs/caps-2 --baseline "
    "runs/cnn-0 runs/cnn-1 runs/cnn-2"
)


def _attack_flags(p: argparse.ArgumentParser) -> None:
    _common(p, baseline=True, seeds=True)
    p.add_argument(
        "--matched",
        metavar="RECORD",
        help="instead of RUN_DIR and --baseline: the snapshots a viewpoint or affNIST "
        "experiment matched, per model and seed, read from its JSON (the first model is "
        "attacked, the others are its baselines)",
    )
    p.add_argument(
        "--epsilons",
        action=_Floats,
        default=[0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3],
        help="L-inf budgets in [0, 1] pixel units, e.g. 0,0.05,0.1",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=("fgsm", "bim"),
        default=["fgsm", "bim"],
        help="attacks to run",
    )
    p.add_argument(
        "--targeted",
        choices=("both", "no", "yes"),
        default="both",
        help="untargeted (no), targeted at a random other class (yes) or both",
    )
    p.add_argument(
        "--loss",
        choices=("cross_entropy", "model"),
        default="cross_entropy",
        help="attack loss: softmax cross-entropy on the scores (default) or each "
        "model's paper loss (margin / spread; flat where margins hold)",
    )
    p.add_argument("--steps", type=int, default=10, help="BIM iterations")
    p.add_argument("--step-size", type=float, default=0.25, help="BIM step, fraction of eps")
    p.add_argument("--max-examples", type=int, default=1000, help="test examples (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seeds the targets")


def register_cli(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``experiment`` (with ``experiment attack``), ``report`` and the former
    ``attack`` to a ``capsnet`` subparsers object.

    Returns :data:`HANDLERS` (``{command: handler}``); each parser also sets
    ``args.handler``.
    """
    p = subparsers.add_parser(
        "experiment",
        help="run one of the papers' experiments on a trained model",
        description="The papers' experiments on trained models; each writes JSON + PNG.",
    )
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    sub.required = True
    q = sub.add_parser(
        "attack",
        help="white-box FGSM/BIM robustness of a model (and baselines) over an epsilon sweep",
        description=_ATTACK_DESCRIPTION,
    )
    _attack_flags(q)
    q.set_defaults(handler=_attack)
    for kind, default, unit in (
        ("rotation", [-60, -45, -30, -20, -10, 0, 10, 20, 30, 45, 60], "degrees"),
        ("translation", [-8, -6, -4, -2, 0, 2, 4, 6, 8], "pixels"),
        ("scale", [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4], "zoom"),
    ):
        q = sub.add_parser(kind, help=f"accuracy vs {kind} of the test images ({unit})")
        _common(q, baseline=True)
        q.add_argument("--values", action=_Floats, default=default, help=f"{kind}s ({unit})")
        q.add_argument("--train-range", action=_Floats, help="shade this range: LOW HIGH")
        q.add_argument("--max-examples", type=int, default=2000, help="test examples (0: all)")
        q.set_defaults(handler=_sweep, kind=kind)
    q = sub.add_parser("reconstruction", help="reconstructions and pose perturbations")
    _common(q, baseline=False)
    q.add_argument("--num-examples", type=int, default=20, help="test inputs reconstructed")
    q.add_argument("--num-perturbed", type=int, default=3, help="inputs whose poses are perturbed")
    q.set_defaults(handler=_reconstruction)
    q = sub.add_parser("routing", help="couplings per iteration, vote distances, dead capsules")
    _common(q, baseline=False)
    q.add_argument("--num-examples", type=int, default=3, help="inputs drawn in detail")
    q.add_argument("--max-examples", type=int, default=500, help="inputs in the statistics")
    q.add_argument(
        "--dead-threshold",
        type=float,
        default=0.01,
        help="a capsule is dead below this activation",
    )
    q.set_defaults(handler=_routing)
    q = sub.add_parser("equivariance", help="linear-map residual of poses under transforms")
    _common(q, baseline=True)
    q.add_argument("--translations", action=_Floats, default=[1, 2, 3, 4], help="pixels")
    q.add_argument("--rotations", action=_Floats, default=[5, 10, 20, 30], help="degrees")
    q.add_argument("--max-examples", type=int, default=2000, help="test examples (0: all)")
    q.set_defaults(handler=_equivariance)
    q = sub.add_parser(
        "viewpoint-equivariance",
        help="NORB-style data: one linear map from the pose at azimuth a to a + 20 degrees",
        description="Fit f(x at azimuth a + step) = A f(x at a) + b on the training "
        "instances' image pairs and test it on the held-out instances' pairs, for the class "
        "capsule poses and, at equal dimension (PCA), a CNN's features. Uses the run's "
        "dataset with every view (its viewpoint split is dropped).",
    )
    _common(q, baseline=True)
    q.add_argument("--step", type=int, default=20, help="azimuth step in degrees (x 20)")
    q.add_argument(
        "--max-pairs", type=int, default=4000, help="image pairs per split, seeded (0: all)"
    )
    q.set_defaults(handler=_viewpoint_equivariance)
    q = sub.add_parser(
        "affnist",
        help="models trained on shifted 40x40 MNIST, tested on affNIST (or the generated set)",
    )
    _common(q, baseline=True)
    q.add_argument(
        "--affine-dataset",
        default="auto",
        help="affnist, affnist_generated, or auto (affnist when present)",
    )
    q.add_argument("--max-examples", type=int, default=0, help="test examples (0: all)")
    q.set_defaults(handler=_affnist)
    q = sub.add_parser(
        "viewpoint",
        help="train capsules and a CNN on familiar smallNORB views, compare on novel views",
        description="Hinton et al. 2018 section 5.2: both models are trained (several seeds) "
        "on the familiar azimuths (or elevations), matched on familiar-view validation "
        "error at quarter-epoch snapshots, and compared on the novel views with bootstrap "
        "intervals and paired tests. Resumable: run the same command again.",
    )
    q.add_argument(
        "--mode", choices=("azimuth", "elevation"), default="azimuth", help="novel viewpoints"
    )
    q.add_argument(
        "--dataset",
        choices=("smallnorb", "toynorb"),
        default="smallnorb",
        help="smallNORB, or the rendered ToyNORB stand-in (same files and splits)",
    )
    _protocol_flags(q, "matrix_capsnet_smallnorb_{mode}", "hinton_cnn_smallnorb_{mode}")
    q.set_defaults(handler=_viewpoint)
    q = sub.add_parser(
        "affnist-protocol",
        help="train capsules and a CNN on shifted 40x40 MNIST, compare on affine digits",
        description="Sabour et al. 2017 section 5.2 with training: both models are trained "
        "(several seeds) on mnist_shifted40 and compared on affNIST (or the generated "
        "affNIST-style set) at matched shifted-MNIST validation error. Resumable.",
    )
    q.add_argument(
        "--affine-dataset",
        default="auto",
        help="affnist, affnist_generated, or auto (affnist when present)",
    )
    _protocol_flags(q, "capsnet_affnist", "sabour_cnn_affnist")
    q.set_defaults(handler=_affnist_protocol)
    q = sub.add_parser(
        "seeds",
        help="test error over training seeds with 95 %% intervals; paired against a baseline",
        description="Score each run (one per training seed) on the same test images and "
        "report each model's pooled error with a bootstrap interval over images and seeds; "
        "against each --baseline model (the same number of runs), the paired difference, "
        "McNemar's test and the relative reduction of errors. Example: capsnet experiment "
        "seeds runs/caps-0 runs/caps-1 runs/caps-2 --baseline runs/cnn-0 runs/cnn-1 runs/cnn-2",
    )
    q.add_argument(
        "runs", metavar="RUN_DIR", nargs="+", help="the first model's runs, one per seed"
    )
    q.add_argument(
        "--baseline",
        metavar="RUN_DIR",
        nargs="+",
        action="append",
        default=[],
        help="another model's runs, one per seed; repeat the flag for more models",
    )
    q.add_argument(
        "--which",
        choices=("best", "last"),
        default="best",
        help="checkpoint of each run (best: the run's selection, on validation data by default)",
    )
    q.add_argument("--dataset", help="test on another dataset (default: the runs')")
    q.add_argument("--split", default="test", help="dataset split (default: test)")
    q.add_argument("--data-root", help="data folder (default: the first run's)")
    q.add_argument("--download", action="store_true", help="download missing data")
    q.add_argument(
        "--max-examples", type=int, default=0, help="a seeded random subset of test images (0: all)"
    )
    add_output_dir(q, "output folder (default: FIRST_RUN_DIR/experiments/seeds)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    q.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    _threads_flag(q)
    q.set_defaults(handler=_seeds)
    q = sub.add_parser("all", help="every experiment that applies to the model")
    _common(q, baseline=True)
    q.add_argument("--max-examples", type=int, default=1000, help="test examples (0: all)")
    q.set_defaults(handler=_all)

    p = subparsers.add_parser(
        "report", help="one HTML page with the training curves and every experiment of a run"
    )
    p.add_argument("run", metavar="RUN_DIR", help="run directory (or experiment folder)")
    p.add_argument("--output", metavar="FILE", help="HTML file (default: RUN_DIR/report.html)")
    p.set_defaults(handler=_report)

    p = subparsers.add_parser(
        "attack",
        help="former name of `capsnet experiment attack` (still works)",
        description="The former name of `capsnet experiment attack`: " + _ATTACK_DESCRIPTION,
    )
    _attack_flags(p)
    p.set_defaults(handler=_attack_alias)
    return HANDLERS


# --------------------------------------------------------------------------- handlers


def _progress(args: argparse.Namespace) -> Any:
    if args.no_progress:
        return None
    from tqdm.auto import tqdm

    return tqdm


def _setup(args: argparse.Namespace, experiment: str) -> tuple[list[Run], Any, Path, str]:
    from capsnet.devices import resolve_device

    device = str(resolve_device(args.device))
    runs = [load_run(args.run, which=args.which, device=device)]
    runs += [load_run(b, which=args.which, device=device) for b in getattr(args, "baseline", [])]
    _unique_labels(runs)
    dataset = runs[0].dataset(
        args.split, dataset=args.dataset, data_root=args.data_root, download=args.download
    )
    out = Path(args.output_dir or runs[0].run_dir / "experiments" / experiment)
    return runs, dataset, out, device


def _limit(n: int | None) -> int | None:
    return None if not n else n


def _done(record: dict[str, Any], out: Path) -> int:
    """Print the record's headline table (its summary rows), then where it was written."""
    print(f"{record['title']}: {out / (record['experiment'] + '.json')}")
    table = format_table(record.get("summary") or [])
    if table:
        print("  " + table.replace("\n", "\n  "))
    for f in record["figures"]:
        print(f"  figure: {out / f}")
    return 0


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapper(args: argparse.Namespace) -> int:
        import torch

        from capsnet.runtime import choose_threads

        # --num-threads, else the start-of-run thread policy of capsnet.runtime (a busy
        # core would otherwise stall every small routing operation: benchmarks/RESULTS.md)
        device = (
            "cuda"
            if getattr(args, "device", "cpu") != "cpu" and torch.cuda.is_available()
            else "cpu"
        )
        threads, _, _ = choose_threads(getattr(args, "num_threads", None) or None, device=device)
        torch.set_num_threads(threads)
        try:
            return fn(args)
        except (*USER_ERRORS, KeyError) as err:
            if os.environ.get("CAPSNET_TRACEBACK"):
                raise
            return fail(str(err))

    wrapper.__name__ = fn.__name__
    return wrapper


@_guard
def _attack(args: argparse.Namespace) -> int:
    from capsnet import experiments
    from capsnet.devices import resolve_device

    labels: list[str] | None = None  # the record's labels with --matched
    if args.matched is not None:
        if args.run or args.baseline:
            raise ValueError("give either --matched RECORD or RUN_DIR (and --baseline), not both")
        matched = _matched_snapshots(Path(args.matched))
        labels, paths = list(matched), list(matched.values())
    elif not args.run:
        raise ValueError("give RUN_DIR (one per seed), or --matched RECORD")
    else:
        paths = [list(args.run), *[list(group) for group in args.baseline]]
    if any(len(group) != len(paths[0]) for group in paths):
        raise ValueError(
            f"every model needs one run per seed: {len(paths[0])} RUN_DIR, but "
            + ", ".join(f"{len(g)}" for g in paths[1:])
            + " in the --baseline groups"
        )
    seeds = len(paths[0])
    if seeds == 1 and labels is None:
        args.run, args.baseline = paths[0][0], [g[0] for g in paths[1:]]
        runs, dataset, out, device = _setup(args, "attack")
        model_arg: Any = {r.label: r.model for r in runs}
        run_attack: Callable[..., dict[str, Any]] = experiments.attack_experiment
    else:
        device = str(resolve_device(args.device))
        groups = _load_seed_groups(paths, args, device)
        if labels is None:
            _unique_labels([g[0] for g in groups])
            labels = [g[0].label for g in groups]
            if len(set(labels)) < len(labels):  # the same run twice: number the models
                labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
        for label, g in zip(labels, groups, strict=True):
            for r in g:
                r.label = label
        dataset = groups[0][0].dataset(
            args.split, dataset=args.dataset, data_root=args.data_root, download=args.download
        )
        out = Path(args.output_dir or groups[0][0].run_dir / "experiments" / "attack_seeds")
        runs = [g[0] for g in groups]
        model_arg = {g[0].label: [r.model for r in g] for g in groups}
        run_attack = experiments.attack_seeds_experiment
    targeted = {"both": (False, True), "no": (False,), "yes": (True,)}[args.targeted]
    record = run_attack(
        model_arg,
        dataset,
        out,
        epsilons=args.epsilons,
        methods=args.methods,
        targeted=targeted,
        losses=args.loss,
        model_names={r.label: r.name for r in runs},
        steps=args.steps,
        step_size_fraction=args.step_size,
        max_examples=_limit(args.max_examples),
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
        progress=_progress(args),
    )
    return _done(record, out)


def _load_seed_groups(
    paths: list[list[str]], args: argparse.Namespace, device: str
) -> list[list[Run]]:
    """Each model's runs (one per training seed), loaded; every group must be one model, and
    (without ``--dataset``) every run trained on the first run's dataset."""
    groups = [[load_run(p, which=args.which, device=device) for p in group] for group in paths]
    first = groups[0][0]
    for group in groups:
        for r in group:
            if args.dataset is None and r.config.get("dataset") != first.config.get("dataset"):
                raise ValueError(
                    f"{r.run_dir} was trained on {r.config.get('dataset')!r}, {first.run_dir} on "
                    f"{first.config.get('dataset')!r}; give --dataset to test all on one dataset"
                )
        names = {r.name for r in group}
        if len(names) > 1:
            raise ValueError(
                f"the runs of one model must be one model (seeds of it), got {sorted(names)} "
                f"in {[str(r.run_dir) for r in group]}; give each model its own --baseline"
            )
    return groups


def _matched_snapshots(record_path: Path) -> dict[str, list[str]]:
    """``{label: [snapshot of seed 0, ...]}`` from a matched-protocol record (viewpoint,
    affNIST): ``results.models.LABEL.per_seed[].snapshot`` under ``runs/LABEL/seed-S/``."""
    record = json.loads(record_path.read_text())
    models = (record.get("results") or {}).get("models")
    if not isinstance(models, dict) or not all(
        isinstance(m, dict) and m.get("per_seed") for m in models.values()
    ):
        raise ValueError(
            f"{record_path} is not a matched-protocol record (a viewpoint or affNIST "
            "experiment's JSON with results.models.LABEL.per_seed)"
        )
    root = record_path.parent / "runs"
    return {
        label: [
            str(root / label / f"seed-{row['seed']}" / row["snapshot"]) for row in m["per_seed"]
        ]
        for label, m in models.items()
    }


def _attack_alias(args: argparse.Namespace) -> int:
    print("capsnet: note: `capsnet attack` is now `capsnet experiment attack`", file=sys.stderr)
    return _attack(args)


@_guard
def _sweep(args: argparse.Namespace) -> int:
    from capsnet import experiments

    runs, dataset, out, device = _setup(args, f"{args.kind}_sweep")
    train_range = tuple(args.train_range) if args.train_range else None
    if train_range is not None and len(train_range) != 2:
        raise ValueError(f"--train-range takes two numbers, got {args.train_range}")
    record = experiments.transform_sweep(
        {r.label: r.model for r in runs},
        dataset,
        out,
        kind=args.kind,
        values=args.values,
        train_range=train_range,
        max_examples=_limit(args.max_examples),
        batch_size=args.batch_size,
        model_names={r.label: r.name for r in runs},
        device=device,
        progress=_progress(args),
    )
    return _done(record, out)


@_guard
def _reconstruction(args: argparse.Namespace) -> int:
    from capsnet import experiments

    runs, dataset, out, device = _setup(args, "reconstruction")
    record = experiments.reconstruction_experiment(
        runs[0].model,
        dataset,
        out,
        num_examples=args.num_examples,
        num_perturbed=args.num_perturbed,
        label=runs[0].label,
        device=device,
    )
    return _done(record, out)


@_guard
def _routing(args: argparse.Namespace) -> int:
    from capsnet import experiments

    runs, dataset, out, device = _setup(args, "routing")
    record = experiments.routing_experiment(
        runs[0].model,
        dataset,
        out,
        num_examples=args.num_examples,
        max_examples=_limit(args.max_examples),
        batch_size=args.batch_size,
        dead_threshold=args.dead_threshold,
        label=runs[0].label,
        device=device,
        progress=_progress(args),
    )
    return _done(record, out)


@_guard
def _equivariance(args: argparse.Namespace) -> int:
    from capsnet import experiments

    runs, dataset, out, device = _setup(args, "equivariance")
    record = experiments.equivariance_experiment(
        {r.label: r.model for r in runs},
        dataset,
        out,
        translations=args.translations,
        rotations=args.rotations,
        max_examples=args.max_examples or len(dataset),
        batch_size=args.batch_size,
        model_names={r.label: r.name for r in runs},
        device=device,
        progress=_progress(args),
    )
    return _done(record, out)


@_guard
def _viewpoint_equivariance(args: argparse.Namespace) -> int:
    from capsnet import experiments

    runs, _, out, device = _setup(args, "viewpoint_equivariance")
    # every view: a viewpoint split (familiar azimuths only) has too few pairs a, a + 20
    every_view = {"viewpoint": None} if "viewpoint" in runs[0].config.get("data_kwargs", {}) else {}
    sets = {
        split: runs[0].dataset(
            split,
            dataset=args.dataset,
            data_root=args.data_root,
            download=args.download,
            **every_view,
        )  # fmt: skip
        for split in ("train", "test")
    }
    record = experiments.viewpoint_equivariance_experiment(
        {r.label: r.model for r in runs},
        sets["train"],
        sets["test"],
        out,
        step_degrees=args.step,
        max_pairs=_limit(args.max_pairs),
        batch_size=args.batch_size,
        model_names={r.label: r.name for r in runs},
        device=device,
        progress=_progress(args),
    )
    return _done(record, out)


@_guard
def _affnist(args: argparse.Namespace) -> int:
    from capsnet import experiments

    runs, familiar, out, device = _setup(args, "affnist")
    affine = experiments.affine_test_set(
        args.affine_dataset,
        data_root=args.data_root or runs[0].config.get("data_root"),
        download=args.download,
    )
    record = experiments.affnist_experiment(
        {r.label: r.model for r in runs},
        familiar,
        affine,
        out,
        max_examples=_limit(args.max_examples),
        batch_size=args.batch_size,
        model_names={r.label: r.name for r in runs},
        device=device,
    )
    return _done(record, out)


def _protocol_configs(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """``{label: RunConfig}`` from the two recipes and the override flags."""
    from capsnet.config import load_recipe

    common = dict(args.set)
    if args.epochs is not None:
        common["epochs"] = args.epochs
    if args.data_root:
        common["data_root"] = args.data_root
    if getattr(args, "download", False):
        common["download"] = True
    if args.device != "auto":
        common["device"] = args.device
    configs = {}
    for label, (recipe, kwargs, own) in {
        "capsules": (args.recipe, dict(args.model_kwarg), dict(args.capsule_set)),
        "cnn": (args.baseline_recipe, dict(args.baseline_model_kwarg), dict(args.baseline_set)),
    }.items():
        recipe = recipe.format(**names)
        extra = {"model_kwargs": kwargs} if kwargs else {}
        configs[label] = load_recipe(recipe, **{**common, **own}, **extra)
    return configs


def _rule_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The matching-rule flags given on the command line (the experiment's defaults else)."""
    flags = {"smooth": args.smooth, "val_per_seed": args.val_per_seed}
    return {k: v for k, v in flags.items() if v is not None}


@_guard
def _viewpoint(args: argparse.Namespace) -> int:
    from capsnet import experiments

    configs = _protocol_configs(args, mode=args.mode)
    out = Path(args.output_dir or Path("runs") / "experiments" / f"viewpoint_{args.mode}")
    record = experiments.viewpoint_experiment(
        configs,
        out,
        mode=args.mode,
        dataset=args.dataset,
        epochs=None,  # each config carries its own (--epochs, --capsule-set, --baseline-set)
        seeds=range(args.seeds),
        snapshots_per_epoch=args.snapshots_per_epoch,
        target_error=args.target_error,
        **_rule_flags(args),
        max_examples=_limit(args.max_examples),
        batch_size=args.batch_size,
        device=args.device,
    )
    return _done(record, out)


@_guard
def _affnist_protocol(args: argparse.Namespace) -> int:
    from capsnet import experiments

    configs = _protocol_configs(args)
    out = Path(args.output_dir or Path("runs") / "experiments" / "affnist_protocol")
    record = experiments.affnist_protocol(
        configs,
        out,
        affine=args.affine_dataset,
        epochs=None,  # each config carries its epochs
        seeds=range(args.seeds),
        snapshots_per_epoch=args.snapshots_per_epoch,
        target_error=args.target_error,
        **_rule_flags(args),
        max_examples=_limit(args.max_examples),
        batch_size=args.batch_size,
        device=args.device,
    )
    return _done(record, out)


def _run_description(run: Run) -> dict[str, Any]:
    """What a run contributes to ``experiment seeds``: folder, seed, checkpoint and what
    the checkpoint was selected on (``val``, ``test``, or ``last`` / a file's name)."""
    from capsnet.runs import read_run_json

    sidecar = read_run_json(run.weights.parent, run.weights.with_suffix(".json").name)
    if run.weights.stem == "best":
        selected_on = (sidecar.get("best") or {}).get("selected_on", "unknown")
    else:
        selected_on = run.weights.stem  # "last", or a snapshot / step file
    return {
        "run": str(run.run_dir),
        "checkpoint": run.weights.name,
        "seed": run.config.get("seed"),
        "epoch": run.epoch,
        "step": run.step,
        "selected_on": selected_on,
    }


@_guard
def _seeds(args: argparse.Namespace) -> int:
    from capsnet import experiments
    from capsnet.devices import resolve_device

    device = str(resolve_device(args.device))
    paths = [list(args.runs), *[list(group) for group in args.baseline]]
    groups = _load_seed_groups(paths, args, device)
    first = groups[0][0]
    labels = [group[0].name for group in groups]
    for i, group in enumerate(groups):
        if labels.count(group[0].name) > 1:
            labels[i] = f"{group[0].name} ({group[0].run_dir.name})"
    dataset = first.dataset(
        args.split, dataset=args.dataset, data_root=args.data_root, download=args.download
    )
    out = Path(args.output_dir or first.run_dir / "experiments" / "seeds")
    record = experiments.seed_comparison(
        {label: [r.model for r in group] for label, group in zip(labels, groups, strict=True)},
        dataset,
        out,
        runs={
            label: [_run_description(r) for r in group]
            for label, group in zip(labels, groups, strict=True)
        },
        model_names={label: group[0].name for label, group in zip(labels, groups, strict=True)},
        max_examples=_limit(args.max_examples),
        batch_size=args.batch_size,
        device=device,
        progress=_progress(args),
    )
    for note in record["notes"][1:]:
        print(f"note: {note}")
    return _done(record, out)


@_guard
def _all(args: argparse.Namespace) -> int:
    from capsnet import experiments
    from capsnet.models import model_info

    runs, dataset, out_root, device = _setup(args, "")
    models = {r.label: r.model for r in runs}
    names = {r.label: r.name for r in runs}
    n = _limit(args.max_examples)
    prog = _progress(args)
    records = [
        experiments.attack_experiment(
            models,
            dataset,
            out_root / "attack",
            model_names=names,
            max_examples=n,
            batch_size=args.batch_size,
            device=device,
            progress=prog,
        ),
        experiments.transform_sweep(
            models,
            dataset,
            out_root / "rotation_sweep",
            kind="rotation",
            max_examples=n,
            batch_size=args.batch_size,
            model_names=names,
            device=device,
            progress=prog,
        ),
        experiments.equivariance_experiment(
            models,
            dataset,
            out_root / "equivariance",
            max_examples=n or len(dataset),
            batch_size=args.batch_size,
            model_names=names,
            device=device,
            progress=prog,
        ),
    ]
    main = runs[0]
    is_capsule = model_info(main.name).loss != "cross_entropy"
    if is_capsule and getattr(main.model, "decoder", None) is not None:
        records.append(
            experiments.reconstruction_experiment(
                main.model, dataset, out_root / "reconstruction", label=main.label, device=device
            )
        )
    if is_capsule:
        records.append(
            experiments.routing_experiment(
                main.model,
                dataset,
                out_root / "routing",
                max_examples=min(n or 500, 500),
                label=main.label,
                device=device,
                progress=prog,
            )
        )
    for record in records:
        _done(record, out_root / record["experiment"])
    return 0


@_guard
def _report(args: argparse.Namespace) -> int:
    from capsnet import report

    path = report.build_report(args.run, output=args.output)
    print(f"report written to {path}")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "attack": _attack_alias,
    "experiment": lambda args: args.handler(args),
    "report": _report,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run these subcommands on their own: ``python -m capsnet.experiment_cli experiment
    attack RUN``."""
    parser = CapsnetParser(
        prog="capsnet", description="Capsule network experiments: experiment, report."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register_cli(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
