"""Does routing find agreement? Couplings, vote distances per iteration ([H18] Fig. 2).

The class capsule layer's routing call is recorded with
:func:`capsnet.probes.capture_routing` and re-run with 1..r iterations
(:func:`capsnet.probes.routing_trace`): the assignment of the votes to the true class and
the vote-to-parent-mean distances, per iteration, as in [H18] Fig. 2 (and the coupling
coefficients c_ij of [S17] §2, Procedure 1). Dead capsules: per capsule layer, the
capsules that never activate.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capsnet import functional as CF
from capsnet import plots, probes
from capsnet.devices import resolve_device
from capsnet.experiments.evaluation import (
    Progress,
    class_names,
    describe_models,
    eval_batches,
    model_input,
    pick_examples,
    with_progress,
)
from capsnet.experiments.records import finish_record, make_record

__all__ = ["routing_experiment"]


def _weighted_mean(values: Tensor, weights: Tensor, dim: int) -> Tensor:
    return (values * weights).sum(dim) / weights.sum(dim).clamp_min(1e-12)


def _agreement_sums(state: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
    """Batch sums of the true class's assignment and of the weighted vote distances/cosines."""
    w, c = state["weights"], state["assignments"]  # (B, I, O)
    if w.ndim != 3:
        raise ValueError(f"expected a class capsule routing call, got weights {tuple(w.shape)}")
    onehot = torch.nn.functional.one_hot(labels, w.shape[-1]).to(w.dtype)  # (B, O)
    others = max(w.shape[-1] - 1, 1)
    sums = {"true_assignment": (c.mean(1) * onehot).sum()}
    for key, name in (("distances", "distance"), ("cosines", "cosine")):
        per_class = _weighted_mean(state[key], w, dim=1)  # (B, O)
        sums[f"true_{name}"] = (per_class * onehot).sum()
        sums[f"other_{name}"] = (per_class * (1 - onehot)).sum() / others
    return sums


def _routing_example_figures(
    trace: list[dict[str, Tensor]],
    i: int,
    k: int,
    kind: str,
    names: list[str],
    what: str,
    out_dir: Path,
) -> list[Path]:
    """Coupling heat maps and vote-distance histograms of example ``i`` (figure number k)."""
    coupling = "Coupling coefficients" if kind == "dynamic" else "Assignments"
    return [
        plots.plot_couplings(
            [s["assignments"][i] for s in trace],
            out_dir / f"couplings_{k}.png",
            class_names=names,
            title=f"{coupling}: {what}",
        ),
        plots.plot_routing_histograms(
            [s["distances"][i] for s in trace],
            [s["weights"][i] for s in trace],
            out_dir / f"vote_distances_{k}.png",
            class_names=names,
            title=f"Vote distance to each class capsule's mean, weighted by assignment: {what}",
        ),
    ]


def _em_alive(
    model: nn.Module, dataset: Any, device: torch.device, batch_size: int = 32
) -> dict[str, dict[str, float]]:
    """Per matrix-capsule layer: :func:`capsnet.probes.em_layer_statistics` and
    :func:`capsnet.probes.em_gradient_norms` (spread loss, margin 0.9) on one batch;
    ``{}`` for a model without EM layers."""
    if not probes.em_routing_layers(model):
        return {}
    images, labels = next(iter(eval_batches(dataset, batch_size=batch_size, device=device)))
    x = model_input(dataset, images)
    stats = probes.em_layer_statistics(model, x)
    saved = [p.grad for p in model.parameters()]
    with torch.enable_grad():
        for p in model.parameters():
            p.grad = None
        CF.spread_loss(model(x).scores, labels, margin=0.9).backward()
        grads = probes.em_gradient_norms(model)
    for p, g in zip(model.parameters(), saved, strict=True):
        p.grad = g
    out: dict[str, dict[str, float]] = {}
    for name in [*grads, *stats]:
        out.setdefault(name, {}).update({**grads.get(name, {}), **stats.get(name, {})})
    return out


@torch.no_grad()
def routing_experiment(
    model: nn.Module,
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    num_examples: int = 3,
    max_examples: int | None = 500,
    batch_size: int = 100,
    dead_threshold: float = 0.01,
    label: str = "capsules",
    device: torch.device | str = "cpu",
    progress: Progress = None,
) -> dict[str, Any]:
    """Routing diagnostics of the class capsule layer, and dead capsules per layer.

    * For ``num_examples`` test inputs (correctly classified, distinct classes): the
      couplings / assignments after each routing iteration (heat maps) and the histograms
      of vote-to-parent-mean distances weighted by assignment, per class capsule and
      iteration ([H18] Fig. 2).
    * Over ``max_examples`` test inputs, per iteration: the mean assignment of the votes
      to the true class, and the assignment-weighted mean vote distance to the true class's
      mean vs to the other classes' means. Routing that "finds agreement" concentrates
      assignment on, and tightens the votes around, the true class.
    * Dead capsules: per capsule layer, the fraction of capsules whose activation (length
      for vector capsules) never exceeds ``dead_threshold`` on those inputs.

    Per-iteration states come from re-running the recorded routing call with
    ``iterations = 1..r`` (:func:`capsnet.probes.routing_trace`); the model is unchanged.
    """
    out_dir = Path(out_dir)
    device = resolve_device(device)
    started = time.perf_counter()
    model.to(device).eval()
    names = class_names(dataset)
    layer_acts: dict[str, list[Tensor]] = {}
    sums: list[dict[str, Tensor]] = []
    figures: list[Path] = []
    shown: list[dict[str, Any]] = []
    kind = None
    total = 0
    batches = eval_batches(dataset, batch_size=batch_size, max_examples=max_examples, device=device)
    for images, labels in with_progress(progress, batches, desc=f"{label} routing", leave=False):
        x = model_input(dataset, images)
        with probes.capture_routing(model, last_only=True) as cap:
            out = model(x)
        if not cap.calls:
            raise ValueError(f"{type(model).__name__} does no capsule routing")
        kind = cap.calls[-1].kind
        trace = probes.routing_trace(cap.calls[-1])
        for t, state in enumerate(trace):
            batch = _agreement_sums(state, labels)
            if len(sums) <= t:
                sums.append(batch)
            else:
                sums[t] = {k: sums[t][k] + v for k, v in batch.items()}
        total += labels.shape[0]
        for name, act in probes.capsule_activations(model, x).items():
            layer_acts.setdefault(name, []).append(act.cpu())
        if not shown:
            preds = out.scores.argmax(-1)
            for i in pick_examples(labels, preds, num_examples):
                what = f"test example {i} (label {names[int(labels[i])]}, "
                what += f"predicted {names[int(preds[i])]})"
                figures += _routing_example_figures(
                    trace, i, len(shown), kind, names, what, out_dir
                )
                shown.append(
                    {
                        "index": i,
                        "label": int(labels[i]),
                        "predicted": int(preds[i]),
                        "class_assignment": [s["assignments"][i].mean(0) for s in trace],
                        "mean_distance": [
                            _weighted_mean(s["distances"][i], s["weights"][i], 0) for s in trace
                        ],
                    }
                )
    per_iter = [{k: float(v) / total for k, v in s.items()} for s in sums]
    em_layers = _em_alive(model, dataset, device, batch_size=32)
    dead = probes.dead_capsule_fraction(
        {k: torch.cat(v) for k, v in layer_acts.items()}, threshold=dead_threshold
    )
    iters = list(range(1, len(per_iter) + 1))
    for name, ylabel in (
        ("distance", "weighted mean vote distance to the parent mean"),
        ("cosine", "weighted mean cosine(vote, parent mean)"),
    ):
        figures.append(
            plots.plot_lines(
                iters,
                {
                    "true class": [p[f"true_{name}"] for p in per_iter],
                    "other classes (mean)": [p[f"other_{name}"] for p in per_iter],
                },
                out_dir / f"agreement_{name}.png",
                xlabel="routing iteration",
                ylabel=ylabel,
                title=f"Agreement of the votes with each class capsule, {total} test inputs",
            )
        )
    figures.append(
        plots.plot_bars(
            {layer: {label: frac} for layer, frac in dead.items()},
            out_dir / "dead_capsules.png",
            ylabel=f"fraction with activation <= {dead_threshold:g}",
            ylim=(0, 1.05),
            title="Dead capsules per layer",
        )
    )
    summary = [{"iteration": t + 1, **p} for t, p in enumerate(per_iter)] + [
        {"layer": k, "dead fraction": v, "capsules": int(layer_acts[k][0].shape[1])}
        for k, v in dead.items()
    ]
    summary += [{"layer": k, **v} for k, v in em_layers.items()]
    record = make_record(
        "routing",
        "Routing diagnostics",
        device=device,
        started=started,
        settings={
            "routing": kind,
            "num_examples": num_examples,
            "max_examples": total,
            "dead_threshold": dead_threshold,
        },
        models=describe_models({label: model}, None),
        results={
            "per_iteration": per_iter,
            "dead_fraction": dead,
            "em_layers": em_layers,
            "examples": shown,
        },
        figures=figures,
        summary=summary,
        notes=[
            "Per-iteration states: the recorded class-layer routing re-run with 1..r iterations.",
            "Cosine: cos(vote_ij, mean_j), a scale-free agreement (dynamic routing rewards "
            "the scalar product u_hat . v, so long agreeing votes can sit far from the mean "
            "in absolute distance).",
            "Distance: |vote_ij - mean_j|; weight: c_ij (dynamic routing, mean = "
            "sum_i c_ij u_hat_j|i / sum_i c_ij) or R_ij a_i (EM, mean = mu_j).",
            "EM layers (is EM alive?): std and saturated fraction (< 0.01 or > 0.99) of the "
            "output activations, mean data mass per parent sum_i R_ij a_i, and gradient "
            "norms of the activation path (beta_a; primary: activation conv) vs the pose "
            "path (W, beta_u; primary: pose conv) of the spread loss at margin 0.9, on the "
            "first 32 test inputs.",
        ],
    )
    return finish_record(out_dir, record)
