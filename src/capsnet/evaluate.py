"""Evaluation: test error, per-class accuracy, confusion matrix and capsule statistics.

:func:`evaluate` runs a model over a loader; :func:`evaluate_checkpoint` does the same for a
saved run (what ``capsnet evaluate`` calls). Under ``torch.distributed`` every rank
evaluates its shard and the counts are summed, so the result covers the whole split.

Letters: B batch, K classes (class capsules).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from tqdm.auto import tqdm

from capsnet import distributed
from capsnet.devices import resolve_device
from capsnet.io import check_writable, write_json

__all__ = ["EvalResult", "evaluate", "evaluate_checkpoint"]


@dataclass
class EvalResult:
    """Results of :func:`evaluate`; ``to_dict()`` is what gets written as JSON.

    Attributes:
        num_examples: examples evaluated.
        accuracy: fraction classified correctly (argmax of the scores).
        error: ``1 - accuracy``.
        loss: mean per-example loss when a loss function was given, else None.
        per_class_accuracy: ``(K,)`` recall of each class (None for absent classes).
        confusion: ``(K, K)`` counts, row = true class, column = predicted class.
        classes: class names.
        mean_scores: capsule models: ``(K,)`` mean length / activation of each class
            capsule over all examples; None for CNNs (their scores are logits).
        mean_scores_by_class: capsule models: ``(K, K)`` mean score of capsule ``j``
            (column) over the examples of true class ``i`` (row).
    """

    num_examples: int
    accuracy: float
    error: float
    loss: float | None
    per_class_accuracy: list[float | None]
    confusion: list[list[int]]
    classes: list[str]
    mean_scores: list[float] | None = None
    mean_scores_by_class: list[list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A human-readable report: error, per-class accuracy, confusion matrix."""
        k = len(self.classes)
        names = [c[:10] for c in self.classes]
        width = max(6, *(len(n) for n in names))
        lines = [
            f"examples {self.num_examples}   accuracy {100 * self.accuracy:.2f}%   "
            f"error {100 * self.error:.2f}%" + (f"   loss {self.loss:.4f}" if self.loss else "")
        ]
        header = "".rjust(width) + "  acc %  " + " ".join(n.rjust(width) for n in names)
        scores = self.mean_scores is not None and self.mean_scores_by_class is not None
        if scores:  # capsule i on images of class i, and on the other images
            header += "   own  other"
        lines += ["confusion (rows: true class, columns: predicted)", header]
        n = self.num_examples
        for i in range(k):
            acc = self.per_class_accuracy[i]
            row = names[i].rjust(width) + (
                f"{100 * acc:7.2f}  " if acc is not None else "    -    "
            )
            row += " ".join(str(c).rjust(width) for c in self.confusion[i])
            if self.mean_scores is not None and self.mean_scores_by_class is not None:
                n_i = sum(self.confusion[i])
                own = self.mean_scores_by_class[i][i]
                other = (self.mean_scores[i] * n - own * n_i) / max(n - n_i, 1)
                row += f"  {own:.3f}  {other:.3f}"
            lines.append(row)
        if scores:
            lines.append(
                "own / other: mean length (activation) of each class capsule on images of "
                "its class / of the other classes"
            )
        return "\n".join(lines)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, ...]],
    *,
    num_classes: int,
    classes: list[str] | None = None,
    capsule_scores: bool = True,
    loss_fn: Callable[[Any, Tensor, Tensor], Tensor] | None = None,
    precision: str = "fp32",
    limit_batches: int | None = None,
    progress: bool = False,
    labels2: Tensor | None = None,
) -> EvalResult:
    """Evaluate ``model`` on every batch of ``loader`` (in ``eval()`` mode, no gradients).

    Args:
        model: called as ``model(images)`` returning a ``ModelOutput``.
        loader: yields ``(images (B, C, H, W), labels (B,))`` on the model's device.
        num_classes: K.
        classes: class names (default ``"0"``, ``"1"``, ...).
        capsule_scores: the scores are class capsule lengths / activations (report their
            means); False for logits.
        loss_fn: ``loss_fn(output, images, targets) -> (B,)`` per-example loss, optional
            (targets: the labels, or multi-hot ``(B, K)`` with ``labels2``).
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        limit_batches: stop after this many batches.
        progress: show a progress bar.
        labels2: two-digit data (MultiMNIST, [S17] §6): the second label of every
            dataset example ``(N,)``; the loader must yield ``(images, labels, indices)``.
            An example is correct when its two classes are the two top scores; per-class
            accuracy is the recall of each class among the top two; ``confusion`` and
            ``mean_scores_by_class`` count the first digit only.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    k = num_classes
    confusion = torch.zeros(k * k, dtype=torch.float64, device=device)
    score_sums = torch.zeros(k, k, dtype=torch.float64, device=device)  # (true, capsule)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if limit_batches is not None and total is not None:
        total = min(total, limit_batches)
    bar = tqdm(total=total, desc="evaluate", leave=False, disable=not progress, unit="batch")
    # Two-digit data: correct examples, and per class (present, recalled in the top two).
    multi = torch.zeros(1 + 2 * k, dtype=torch.float64, device=device)
    for i, batch in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        images, labels = batch[0], batch[1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(images)
        scores = out.scores.float()
        preds = scores.argmax(-1)
        confusion += torch.bincount(labels * k + preds, minlength=k * k).to(confusion.dtype)
        score_sums.index_add_(0, labels, scores.double())
        targets: Tensor = labels
        if labels2 is not None:
            second = labels2[batch[2]].to(device)
            present = TF.one_hot(labels, k) + TF.one_hot(second, k)
            top2 = TF.one_hot(scores.topk(2, -1).indices, k).sum(1)
            multi[0] += (present * top2).sum(-1).eq(2).sum()
            multi[1 : k + 1] += present.sum(0)
            multi[k + 1 :] += (present * top2).sum(0)
            targets = present.clamp(max=1).float()
        if loss_fn is not None:
            loss_sum += loss_fn(out, images, targets).double().sum()
        bar.update()
    bar.close()
    model.train(was_training)
    for t in (confusion, score_sums, loss_sum, multi):
        distributed.all_reduce_sum(t)
    matrix = confusion.reshape(k, k).round().long().cpu()
    per_class_n = matrix.sum(1)
    n = int(per_class_n.sum())
    if n == 0:
        raise ValueError("evaluate: the loader yielded no examples")
    correct = int(matrix.diagonal().sum())
    per_class = [
        (int(matrix[i, i]) / int(per_class_n[i])) if per_class_n[i] > 0 else None for i in range(k)
    ]
    result = EvalResult(
        num_examples=n,
        accuracy=correct / n,
        error=1 - correct / n,
        loss=float(loss_sum) / n if loss_fn is not None else None,
        per_class_accuracy=per_class,
        confusion=matrix.tolist(),
        classes=list(classes) if classes is not None else [str(i) for i in range(k)],
    )
    if labels2 is not None:
        multi = multi.cpu()
        result.accuracy = float(multi[0]) / n
        result.error = 1 - result.accuracy
        result.per_class_accuracy = [
            float(multi[k + 1 + j] / multi[1 + j]) if multi[1 + j] > 0 else None for j in range(k)
        ]
    if capsule_scores:
        sums = score_sums.cpu()
        result.mean_scores = (sums.sum(0) / n).tolist()
        by_class = sums / per_class_n.clamp(min=1).double().unsqueeze(1)
        result.mean_scores_by_class = by_class.tolist()
    return result


def evaluate_checkpoint(
    path: str | Path,
    *,
    which: str = "best",
    split: str | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    download: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "fp32",
    limit_batches: int | None = None,
    output: str | Path | None = None,
    progress: bool = True,
) -> tuple[EvalResult, Path]:
    """Evaluate a saved model on its dataset (from the run config stored with it).

    Args:
        path: run directory or ``.safetensors`` checkpoint.
        which: ``"best"`` or ``"last"`` in a run directory.
        split: dataset split (default: the run's ``eval_split``).
        dataset, data_root, download: override the run's data settings.
        batch_size, device, precision, limit_batches, progress: as in :func:`evaluate`.
        output: JSON file for the results (default: ``evaluation_<which>_<split>.json`` in
            the run directory, or ``<checkpoint>.<split>.eval.json`` next to a file).

    Returns:
        The result and the JSON file written.
    """
    from capsnet import data
    from capsnet.models import model_info
    from capsnet.runs import load_run

    dev = resolve_device(device)
    run = load_run(path, which=which, device=dev)
    split = split or run.config.get("eval_split", "test")
    if output is None:
        p = Path(path)
        output = (
            p / f"evaluation_{which}_{split}.json"
            if p.is_dir()
            else p.with_name(f"{p.stem}.{split}.eval.json")
        )
    check_writable(Path(output).parent)  # before the evaluation, not after it
    ds = run.dataset(split, dataset=dataset, data_root=data_root, download=download)
    name = dataset or run.config.get("dataset")
    model = run.model
    two_digits = "labels2" in getattr(ds, "extras", ())
    loader = data.BatchLoader(
        ds, batch_size, shuffle=False, augment=False, drop_last=False, device=dev,
        with_indices=two_digits,
    )  # fmt: skip
    capsule = model_info(run.name).loss != "cross_entropy"
    result = evaluate(
        model,
        loader,
        num_classes=ds.num_classes,
        classes=list(ds.classes),
        capsule_scores=capsule,
        precision=precision,
        limit_batches=limit_batches,
        progress=progress,
        labels2=ds.labels2 if two_digits else None,
    )
    record = {
        "checkpoint": run.path,
        "model": run.name,
        "dataset": name,
        "split": split,
        "epoch": run.epoch,
        "step": run.step,
        **result.to_dict(),
    }
    return result, write_json(output, record)
