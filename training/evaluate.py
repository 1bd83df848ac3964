"""Validation metrics: accuracy, top-k accuracy, per-class scores, confusion matrix."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def top_k_for(n_classes: int) -> int:
    """The k reported as top-k accuracy: 3, or fewer for tiny label sets."""
    return min(3, max(1, n_classes - 1))


def summary_scores(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Cross-entropy loss, accuracy and top-k accuracy of predicted probabilities."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if not len(labels):
        return {"loss": 0.0, "accuracy": 0.0, "top_k": 1, "top_k_accuracy": 0.0}
    k = top_k_for(probabilities.shape[1])
    top_k = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    picked = probabilities[np.arange(len(labels)), labels]
    return {
        "loss": float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0)))),
        "accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
        "top_k": k,
        "top_k_accuracy": float(np.mean(np.any(top_k == labels[:, None], axis=1))),
    }


def evaluate(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Score predicted probabilities against true label indices; return JSON-able metrics."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    indices = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0)
    return {
        "samples": int(len(labels)),
        **summary_scores(probabilities, labels),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=indices).tolist(),
    }
