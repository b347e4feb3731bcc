"""Tests of dwt_jax.data.tasks: the task table and the metrics (vs scipy / NumPy)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import scipy.stats
import tensorflow_datasets as tfds

from dwt_jax.data import tasks
from dwt_jax.data.corpus import DataConfigError

# --- the task table ---------------------------------------------------------


def test_task_table_shapes():
    glue = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    assert set(tasks.TASKS) == {"follows", "source", *(f"glue/{n}" for n in glue)}
    for name, spec in tasks.TASKS.items():
        assert spec.name == name
        assert spec.main_metric in spec.metrics
        assert set(spec.metrics) <= set(tasks.METRICS)
        assert len(spec.text_keys) in (1, 2)
    assert tasks.get_task("glue/stsb").is_regression
    assert not tasks.get_task("glue/mrpc").is_regression
    assert tasks.get_task("glue/mnli").eval_split == "validation_matched"
    assert tasks.get_task("glue/mnli").num_labels == 3
    assert tasks.get_task("glue/cola").main_metric == "matthews_corrcoef"
    follows = tasks.get_task("follows")
    assert follows.metrics == ("accuracy", "f1") and follows.main_metric == "accuracy"
    source = tasks.get_task("source")
    assert source.num_labels == 8 and not source.is_pair and source.main_metric == "accuracy"


@pytest.mark.parametrize("name", [n for n in tasks.TASKS if n.startswith("glue/")])
def test_glue_specs_match_tfds_features(name, tmp_path):
    importlib.import_module("tensorflow_datasets.text.glue")
    features = tfds.builder(name, data_dir=str(tmp_path)).info.features  # Code only: no I/O.
    spec = tasks.get_task(name)
    assert set(features) == {*spec.text_keys, spec.label_key, "idx"}
    for key in spec.text_keys:
        assert isinstance(features[key], tfds.features.Text)
    label = features[spec.label_key]
    if spec.is_regression:
        assert np.dtype(label.np_dtype) == np.float32
    else:
        assert label.num_classes == spec.num_labels


def test_get_task_unknown_names_field_and_known_tasks():
    with pytest.raises(DataConfigError) as info:
        tasks.get_task("glue/nope")
    message = str(info.value)
    assert "data.task" in message and "glue/mrpc" in message and "follows" in message
    assert "\n" not in message


# --- metrics ----------------------------------------------------------------

RNG = np.random.default_rng(0)


def _binary(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, n), rng.integers(0, 2, n)


def test_accuracy_and_weights():
    pred, labels = _binary()
    assert tasks.accuracy(pred, labels) == pytest.approx(np.mean(pred == labels))
    weights = np.random.default_rng(1).integers(0, 3, pred.size).astype(np.float32)
    # Integer weights act like repeating rows; weight 0 drops the row.
    rep = np.repeat(np.arange(pred.size), weights.astype(int))
    assert tasks.accuracy(pred, labels, weights) == pytest.approx(np.mean(pred[rep] == labels[rep]))
    assert tasks.accuracy(pred, labels, np.zeros(pred.size)) == 0.0


def test_f1_hand_computed():
    pred = np.array([1, 1, 0, 0, 1, 0, 1])
    labels = np.array([1, 0, 0, 1, 1, 0, 0])
    # TP=2 (rows 0, 4), FP=2 (rows 1, 6), FN=1 (row 3): P=1/2, R=2/3, F1=4/7.
    assert tasks.f1(pred, labels) == pytest.approx(4 / 7)
    # Dropping rows 1 and 6 (the false positives): P=1, R=2/3, F1=0.8.
    weights = np.array([1, 0, 1, 1, 1, 1, 0])
    assert tasks.f1(pred, labels, weights) == pytest.approx(0.8)
    assert tasks.f1(np.zeros(5, int), np.zeros(5, int)) == 0.0  # No positives anywhere.


def test_matthews_binary_equals_phi_coefficient():
    pred, labels = _binary(300, seed=2)
    tp = np.sum((pred == 1) & (labels == 1))
    tn = np.sum((pred == 0) & (labels == 0))
    fp = np.sum((pred == 1) & (labels == 0))
    fn = np.sum((pred == 0) & (labels == 1))
    expected = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert tasks.matthews_corrcoef(pred, labels) == pytest.approx(expected)
    assert tasks.matthews_corrcoef(pred, labels) == pytest.approx(np.corrcoef(pred, labels)[0, 1])


def test_matthews_multiclass_and_weights():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 150)
    pred = np.where(rng.random(150) < 0.6, labels, rng.integers(0, 3, 150))

    def one_hot_mcc(p, y):  # Gorodkin's R_K: covariance of the one-hot matrices.
        X, Y = np.eye(3)[p], np.eye(3)[y]
        X, Y = X - X.mean(0), Y - Y.mean(0)
        return np.sum(X * Y) / np.sqrt(np.sum(X * X) * np.sum(Y * Y))

    assert tasks.matthews_corrcoef(pred, labels) == pytest.approx(one_hot_mcc(pred, labels))
    keep = rng.random(150) < 0.7
    assert tasks.matthews_corrcoef(pred, labels, keep.astype(float)) == pytest.approx(
        one_hot_mcc(pred[keep], labels[keep])
    )


def test_pearson_matches_scipy_and_ignores_zero_weight_rows():
    x, y = RNG.normal(size=80), RNG.normal(size=80)
    y = y + 0.5 * x
    assert tasks.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    weights = (np.arange(80) % 4 != 0).astype(np.float32)
    x_bad = np.where(weights == 0, np.nan, x)  # Ignored rows may hold anything.
    keep = weights > 0
    assert tasks.pearson(x_bad, y, weights) == pytest.approx(
        scipy.stats.pearsonr(x[keep], y[keep])[0]
    )


def test_spearman_ties_match_scipy():
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5, 4.0, 2.0])
    y = np.array([0.3, 0.1, 0.4, 0.4, 0.9, 0.2, 0.4, 0.0, 0.8, 0.1])
    np.testing.assert_allclose(tasks.rankdata(x), scipy.stats.rankdata(x))
    np.testing.assert_allclose(tasks.rankdata(y), scipy.stats.rankdata(y))
    assert tasks.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0])
    # Ranks are taken over the kept rows only.
    weights = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 1], float)
    keep = weights > 0
    assert tasks.spearman(x, y, weights) == pytest.approx(
        scipy.stats.spearmanr(x[keep], y[keep])[0]
    )
    big_x, big_y = RNG.integers(0, 6, 500), RNG.integers(0, 6, 500)  # Many ties.
    assert tasks.spearman(big_x, big_y) == pytest.approx(scipy.stats.spearmanr(big_x, big_y)[0])


def test_degenerate_inputs_give_zero_not_nan():
    labels = np.array([0, 1, 1, 0, 1])
    constant = np.ones(5, int)
    assert tasks.matthews_corrcoef(constant, labels) == 0.0
    assert tasks.matthews_corrcoef(labels, constant) == 0.0
    scores = np.array([0.1, 0.5, 0.9, 0.3, 0.7])
    for fn in (tasks.pearson, tasks.spearman):
        assert fn(np.full(5, 0.1), scores) == 0.0  # 0.1 is not exact in binary.
        assert fn(scores, np.full(5, 3.0)) == 0.0
        assert fn(scores, scores, np.zeros(5)) == 0.0  # No rows.
        assert fn(scores[:1], scores[:1]) == 0.0  # One row.
    for fn in (tasks.accuracy, tasks.f1, tasks.matthews_corrcoef):
        assert fn(np.zeros(0, int), np.zeros(0, int)) == 0.0


def test_compute_metrics_classification_and_regression():
    mrpc = tasks.get_task("glue/mrpc")
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 1.0], [2.0, 2.5], [5.0, 0.0]])
    labels = np.array([1, 0, 0, 1, 1])
    weights = np.array([1, 1, 1, 1, 0], np.float32)  # The last row is padding.
    out = tasks.compute_metrics(mrpc, logits, labels, weights)
    assert list(out) == ["accuracy", "f1"]
    pred = np.array([1, 0, 1, 1])  # argmax of the first four rows.
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["f1"] == pytest.approx(tasks.f1(pred, labels[:4]))
    assert tasks.compute_metrics(mrpc, np.argmax(logits, -1), labels, weights) == out

    stsb = tasks.get_task("glue/stsb")
    scores = RNG.normal(size=(30, 1)).astype(np.float32)
    gold = scores[:, 0] + RNG.normal(size=30)
    out = tasks.compute_metrics(stsb, scores, gold)
    assert out["pearson"] == pytest.approx(scipy.stats.pearsonr(scores[:, 0], gold)[0], rel=1e-5)
    assert out["spearman"] == pytest.approx(scipy.stats.spearmanr(scores[:, 0], gold)[0])
    assert tasks.compute_metrics(stsb, scores[:, 0], gold) == out
    with pytest.raises(ValueError):
        tasks.compute_metrics(stsb, np.zeros((30, 2)), gold)
    with pytest.raises(ValueError):
        tasks.compute_metrics(mrpc, np.zeros(5, np.float32), labels)
