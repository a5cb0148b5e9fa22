"""Validation: loss, accuracy, confusion matrix and a per-class report."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.normalize import Normalizer


@dataclass
class EvalResult:
    loss: float
    accuracy: float  # a fraction
    confusion: torch.Tensor  # int64 [classes, classes]: rows true label, columns prediction
    samples: int


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, normalize: Normalizer, loss_fn, batch: int = 2000) -> EvalResult:
    """Evaluate on uint8 `images` already on the model's device."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    predicted = torch.empty_like(labels)
    for start in range(0, len(labels), batch):
        y = labels[start : start + batch]
        outputs = model(normalize(images[start : start + batch]))
        loss_sum += loss_fn(outputs, y).double() * len(y)  # batch mean → sum
        predicted[start : start + batch] = outputs.argmax(1)
    model.train(was_training)
    # Counted on the CPU: CUDA's bincount has no deterministic implementation.
    num_classes = 10
    pairs = (labels * num_classes + predicted).cpu()
    confusion = torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return EvalResult(
        loss=loss_sum.item() / len(labels),
        accuracy=confusion.diag().sum().item() / len(labels),
        confusion=confusion,
        samples=len(labels),
    )


def class_report(confusion: torch.Tensor) -> list[dict]:
    """Precision, recall, F1 and support of every class."""
    rows = []
    for c in range(confusion.shape[0]):
        tp = confusion[c, c].item()
        predicted, actual = confusion[:, c].sum().item(), confusion[c, :].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": c, "precision": precision, "recall": recall, "f1": f1, "support": actual})
    return rows


def format_report(confusion: torch.Tensor) -> str:
    lines = ["class  precision  recall      f1  support"]
    for r in class_report(confusion):
        lines.append(f"{r['class']:>5}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:6.4f}  {r['support']:7d}")
    lines.append("")
    lines.append("confusion matrix (rows: true label, columns: predicted)")
    lines.append("      " + "".join(f"{c:>6}" for c in range(confusion.shape[1])))
    for c, row in enumerate(confusion.tolist()):
        lines.append(f"{c:>6}" + "".join(f"{v:>6}" for v in row))
    return "\n".join(lines)
