"""Per-task metrics as SuperGLUE defines them (Wang et al., 2019, table 1).

accuracy = mean(prediction == label).  CB also reports macro-F1: the unweighted mean over all three classes c of
F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c), with F1_c = 0 for a class that occurs in neither the labels nor the
predictions -- the official scorer's convention (jiant's ``CommitmentBankEvaluationScheme`` averages
``f1_score(y_true == c, y_pred == c)`` over every class, a never-seen class scoring 0), not scikit-learn's
``f1_score(average="macro")``, which drops such a class.  It matters on subsets without a class (e.g. a CB quiz
split or a ``max_eval`` cap with no neutral row).  The benchmark's CB score is the mean of accuracy and macro-F1.
Every result also holds ``"main"``, the task's model-selection value.
"""
from __future__ import annotations

import torch

from mpdistil_fast._validation import check_tensor
from mpdistil_fast.data.tasks import task_spec


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over all ``num_classes`` classes; a class absent from both ``labels`` and
    ``predictions`` scores 0 (the official SuperGLUE scorer's convention, see the module docstring)."""
    scores = []
    for cls in range(num_classes):
        predicted, actual = predictions == cls, labels == cls
        denominator = predicted.sum().item() + actual.sum().item()
        true_positive = (predicted & actual).sum().item()
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return sum(scores) / num_classes


def compute_metrics(task: str, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Metrics of ``task`` for ``predictions`` (class ids ``[N]``, or logits ``[N, C]`` with ``C`` the task's
    ``num_labels``, reduced by argmax) against ``labels`` ``[N]``; ids outside ``[0, num_labels)`` and NaN logits
    are refused.
    Returns ``accuracy`` (and ``macro_f1``, ``accuracy_macro_f1_mean`` for CB) and ``main``."""
    spec = task_spec(task)
    check_tensor("predictions", predictions, floating=False)
    check_tensor("labels", labels, floating=False)
    if predictions.dim() == 2:
        if predictions.shape[1] != spec.num_labels:
            raise ValueError(f"logits of {task} must be [N, {spec.num_labels}], got {tuple(predictions.shape)}")
        if predictions.is_floating_point() and (nan_rows := int(predictions.isnan().any(-1).sum())):
            raise ValueError(f"logits of {task} hold NaN in {nan_rows} of {len(predictions)} rows: argmax would count "
                             "each as the NaN's class")
        predictions = predictions.argmax(dim=-1)
    if predictions.dim() != 1 or labels.dim() != 1 or predictions.shape != labels.shape or labels.numel() == 0:
        raise ValueError(f"predictions ([N] ids or [N, C] logits) and labels ([N]) must match and be non-empty, got "
                         f"{tuple(predictions.shape)} and {tuple(labels.shape)}")
    if predictions.is_floating_point() or labels.is_floating_point():
        raise TypeError("predictions given as ids and labels must be integer tensors")
    predictions, labels = predictions.cpu(), labels.cpu()
    for name, ids in (("predictions", predictions), ("labels", labels)):
        if ids.min() < 0 or ids.max() >= spec.num_labels:
            raise ValueError(f"{name} of {task} must be class ids in [0, {spec.num_labels}), got values in "
                             f"[{ids.min().item()}, {ids.max().item()}]")
    result = {"accuracy": (predictions == labels).double().mean().item()}
    if "macro_f1" in spec.metrics:
        result["macro_f1"] = macro_f1(predictions, labels, spec.num_labels)
        result["accuracy_macro_f1_mean"] = (result["accuracy"] + result["macro_f1"]) / 2
    result["main"] = result[spec.main_metric]
    return result
