"""Sentence(-pair) classification / regression tasks and their evaluation metrics.

``TASKS`` maps a task name (``data.task``) to a :class:`TaskSpec`: which record
fields hold the text, how many labels there are (1 = regression), which metrics
are reported and which one a comparison table sorts by. The names of the GLUE
tasks are their TFDS names (``glue/<config>``) and the text keys are TFDS's
feature names. ``'follows'`` is the embedded offline task (see
``classification.py``), shaped like MRPC.

Metrics are NumPy-only (no scikit-learn). Every metric takes optional per-example
``weights``: rows of weight 0 are ignored (the padding rows of eval batches);
other weights scale a row's contribution. Degenerate inputs (no rows, constant
predictions or labels) give 0.0, never NaN.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dwt_jax.errors import DataConfigError


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A fine-tuning task: its inputs, label space and metrics."""

    name: str
    text_keys: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    main_metric: str
    eval_split: str = "validation"
    label_key: str = "label"

    @property
    def is_regression(self) -> bool:
        """Whether the label is a real number (one output, e.g. STS-B) not a class."""
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        """Whether each example has two texts (``[CLS] A [SEP] B [SEP]``)."""
        return len(self.text_keys) == 2


_PAIR = ("sentence1", "sentence2")
_SINGLE = ("sentence",)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("follows", _PAIR, 2, ("accuracy", "f1"), "accuracy"),
        TaskSpec("source", _SINGLE, 8, ("accuracy", "matthews_corrcoef"), "accuracy"),
        TaskSpec("glue/cola", _SINGLE, 2, ("matthews_corrcoef",), "matthews_corrcoef"),
        TaskSpec("glue/sst2", _SINGLE, 2, ("accuracy",), "accuracy"),
        TaskSpec("glue/mrpc", _PAIR, 2, ("accuracy", "f1"), "f1"),
        TaskSpec("glue/qqp", ("question1", "question2"), 2, ("accuracy", "f1"), "f1"),
        TaskSpec("glue/stsb", _PAIR, 1, ("pearson", "spearman"), "spearman"),
        TaskSpec(
            "glue/mnli",
            ("premise", "hypothesis"),
            3,
            ("accuracy",),
            "accuracy",
            eval_split="validation_matched",
        ),
        TaskSpec("glue/qnli", ("question", "sentence"), 2, ("accuracy",), "accuracy"),
        TaskSpec("glue/rte", _PAIR, 2, ("accuracy",), "accuracy"),
        TaskSpec("glue/wnli", _PAIR, 2, ("accuracy",), "accuracy"),
    )
}


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` named ``name``; ``DataConfigError`` naming ``data.task`` if unknown."""
    spec = TASKS.get(str(name))
    if spec is None:
        raise DataConfigError(
            f"data.task={name!r} is unknown; known tasks: {', '.join(sorted(TASKS))}."
        )
    return spec


def _prepare(
    *arrays: np.ndarray, weights: np.ndarray | None
) -> tuple[list[np.ndarray], np.ndarray]:
    """1-D float copies of ``arrays`` and ``weights`` with the zero-weight rows removed."""
    flat = [np.asarray(a).reshape(-1) for a in arrays]
    n = flat[0].shape[0]
    for a in flat[1:]:
        if a.shape[0] != n:
            raise ValueError(f"metric inputs have different lengths: {[x.shape for x in flat]}")
    w = np.ones(n, np.float64) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"weights have {w.shape[0]} rows, predictions {n}")
    if np.any(w < 0):
        raise ValueError("weights must be non-negative")
    keep = w > 0
    return [a[keep] for a in flat], w[keep]


def accuracy(pred: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted fraction of ``pred == labels`` (class ids); 0.0 with no rows."""
    (p, y), w = _prepare(pred, labels, weights=weights)
    total = w.sum()
    return float((w * (p == y)).sum() / total) if total > 0 else 0.0


def f1(pred: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Binary F1 of the positive class 1: 2·TP / (2·TP + FP + FN); 0.0 if undefined."""
    (p, y), w = _prepare(pred, labels, weights=weights)
    tp = (w * ((p == 1) & (y == 1))).sum()
    fp = (w * ((p == 1) & (y != 1))).sum()
    fn = (w * ((p != 1) & (y == 1))).sum()
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom > 0 else 0.0


def matthews_corrcoef(
    pred: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """Matthews correlation (multiclass form, binary as a special case); 0.0 if undefined."""
    (p, y), w = _prepare(pred, labels, weights=weights)
    if w.size == 0:
        return 0.0
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = classes.size
    yi, pi = inverse[: y.size], inverse[y.size :]
    confusion = np.zeros((k, k), np.float64)
    np.add.at(confusion, (yi, pi), w)
    t = confusion.sum(axis=1)  # weight per true class
    q = confusion.sum(axis=0)  # weight per predicted class
    correct, s = np.trace(confusion), confusion.sum()
    cov_yp = correct * s - t @ q
    cov_pp = s * s - q @ q
    cov_yy = s * s - t @ t
    if cov_pp <= 0 or cov_yy <= 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_pp * cov_yy))


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    total = w.sum()
    if total <= 0:
        return 0.0
    xc = x - (w * x).sum() / total
    yc = y - (w * y).sum() / total
    sxx, syy = (w * xc * xc).sum(), (w * yc * yc).sum()
    # Relative threshold: a constant column leaves only rounding noise (~1e-32·Σx²).
    if sxx <= 1e-20 * (w * x * x).sum() or syy <= 1e-20 * (w * y * y).sum():
        return 0.0
    r = (w * xc * yc).sum() / np.sqrt(sxx * syy)
    return float(np.clip(r, -1.0, 1.0))


def pearson(pred: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """(Weighted) Pearson correlation; 0.0 if either side is constant."""
    (p, y), w = _prepare(pred, labels, weights=weights)
    return _weighted_pearson(p.astype(np.float64), y.astype(np.float64), w)


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values get the average of their ranks."""
    x = np.asarray(x).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_run = np.r_[True, xs[1:] != xs[:-1]] if xs.size else np.zeros(0, bool)
    run_of = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], xs.size]
    average_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size, np.float64)
    ranks[order] = average_rank[run_of]
    return ranks


def spearman(pred: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Spearman correlation: Pearson of the average ranks of the kept (weight > 0) rows,
    weighted by ``weights``; 0.0 if either side is constant."""
    (p, y), w = _prepare(pred, labels, weights=weights)
    return _weighted_pearson(rankdata(p), rankdata(y), w)


_CLASS_METRICS = {"accuracy": accuracy, "f1": f1, "matthews_corrcoef": matthews_corrcoef}
_REGRESSION_METRICS = {"pearson": pearson, "spearman": spearman}
METRICS = {**_CLASS_METRICS, **_REGRESSION_METRICS}


def compute_metrics(
    task: TaskSpec,
    predictions: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    """The task's metrics, ``{name: value}`` in ``task.metrics`` order.

    ``predictions``: logits ``[N, C]`` (the argmax is the class; ``[N]`` integer class
    ids are accepted too) for classification, scores ``[N]`` or ``[N, 1]`` for
    regression. ``labels``: ``[N]``. Rows of weight 0 are ignored.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels).reshape(-1)
    if task.is_regression:
        if predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]
        if predictions.ndim != 1:
            raise ValueError(
                f"{task.name} is a regression task: predictions must be [N] or [N, 1], "
                f"got shape {predictions.shape}"
            )
        values = predictions.astype(np.float64)
    else:
        if predictions.ndim == 2:
            values = np.argmax(predictions, axis=-1)
        elif predictions.ndim == 1 and np.issubdtype(predictions.dtype, np.integer):
            values = predictions
        else:
            raise ValueError(
                f"{task.name} is a classification task: predictions must be logits [N, C] "
                f"or class ids [N], got shape {predictions.shape} dtype {predictions.dtype}"
            )
    out = {}
    for name in task.metrics:
        if name not in METRICS:
            raise ValueError(f"task {task.name!r} names unknown metric {name!r}")
        out[name] = METRICS[name](values, labels, weights)
    return out
