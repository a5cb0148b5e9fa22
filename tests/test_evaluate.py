"""harness.evaluate on its own: the figures do not depend on the evaluation batch."""

from __future__ import annotations

import pytest
import torch

from harness.evaluate import class_report, evaluate


def test_the_figures_do_not_depend_on_the_eval_batch():
    """10 images in batches of 3 (the last one short), 10 and 100 give the loss and
    accuracy of one full-batch computation: the loss is summed per image, so a short last
    batch weighs as its images, not as a whole batch (--eval-batch need not divide the
    test or holdout size). The model is left in training mode, as it was."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    to_float = lambda x: x.float().div(255)  # noqa: E731 - the Normalizer's job, simplified
    with torch.no_grad():
        outputs = model(to_float(images))
    labels = outputs.argmax(1)
    labels[:4] = (labels[:4] + 1) % 10  # 6 of the 10 predicted right, spread over the batches
    expected_loss = torch.nn.functional.cross_entropy(outputs, labels).item()
    expected_accuracy = 0.6
    for batch in (3, 10, 100):
        result = evaluate(model, images, labels, to_float, torch.nn.CrossEntropyLoss(), batch=batch)
        assert abs(result.loss - expected_loss) < 1e-6, batch  # float32 sums by batch against one: ~1e-7
        assert result.accuracy == expected_accuracy and result.samples == 10
        assert result.confusion.sum() == 10 and result.confusion.diag().sum() == round(10 * expected_accuracy)
        assert model.training


def test_class_report_figures():
    """test_report.json's per-class figures from a hand-built confusion matrix (rows: true classes)."""
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    confusion[0, 0], confusion[0, 1], confusion[1, 0], confusion[1, 1] = 6, 2, 4, 8  # class 0: 8 true, 10 predicted
    row = class_report(confusion)[0]
    assert row["precision"] == pytest.approx(0.6) and row["recall"] == pytest.approx(0.75) and row["support"] == 8
    assert row["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
