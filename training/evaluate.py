"""Validation metrics: accuracy, top-k accuracy, per-class scores, confusion matrix."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def top_k_for(n_classes: int) -> int:
    """The k reported as top-k accuracy: 3, or fewer for tiny label sets."""
    return min(3, max(1, n_classes - 1))


def evaluate(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Score predicted probabilities against true label indices; return JSON-able metrics."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    n_classes = len(classes)
    predicted = probabilities.argmax(axis=1)
    k = top_k_for(n_classes)
    top_k = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    indices = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0)
    eps = 1e-12
    log_loss = float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels] + eps))) if len(labels) else 0.0
    return {
        "samples": int(len(labels)),
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else 0.0,
        "top_k": k,
        "top_k_accuracy": float(np.mean([lab in row for lab, row in zip(labels, top_k)])) if len(labels) else 0.0,
        "loss": log_loss,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=indices).tolist(),
    }
