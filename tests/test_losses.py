"""dwt_jax.losses against NumPy float64 references, and the properties that define each loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwt_jax import losses


def _numpy_ce(logits, labels):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
    weights = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
    return logits, labels, weights


def test_cross_entropy_matches_numpy(batch):
    logits, labels, weights = batch
    per_instance, scalar = losses.mlm_cross_entropy(logits, labels, weights)
    ce = _numpy_ce(logits, labels)
    expected_per_instance = (ce * weights).sum(-1) / weights.sum(-1)
    expected_scalar = (ce * weights).sum() / weights.sum()
    np.testing.assert_allclose(per_instance, expected_per_instance, rtol=1e-5)
    np.testing.assert_allclose(scalar, expected_scalar, rtol=1e-5)


def test_padded_positions_contribute_nothing(batch):
    logits, labels, weights = batch
    _, scalar = losses.mlm_cross_entropy(logits, labels, weights)
    garbage_logits = np.where(weights[..., None] > 0, logits, 1e4 * np.sign(logits))
    garbage_labels = np.where(weights > 0, labels, 7)
    _, scalar_garbage = losses.mlm_cross_entropy(garbage_logits, garbage_labels, weights)
    np.testing.assert_allclose(scalar, scalar_garbage, rtol=1e-6)


def test_perfect_prediction_has_zero_loss_and_full_accuracy():
    labels = np.array([[1, 2, 3]], np.int32)
    logits = 100.0 * np.eye(5, dtype=np.float32)[labels]
    weights = np.ones((1, 3), np.float32)
    _, loss = losses.mlm_cross_entropy(logits, labels, weights)
    _, acc = losses.mlm_accuracy(logits, labels, weights)
    assert float(loss) < 1e-6
    assert float(acc) == 1.0


def test_uniform_logits_give_log_vocab():
    logits = jnp.zeros((2, 4, 37))
    labels = jnp.zeros((2, 4), jnp.int32)
    _, loss = losses.mlm_cross_entropy(logits, labels, jnp.ones((2, 4)))
    np.testing.assert_allclose(loss, np.log(37), rtol=1e-6)


def test_accuracy_counts_only_weighted_positions(batch):
    logits, labels, weights = batch
    per_instance, scalar = losses.mlm_accuracy(logits, labels, weights)
    correct = (logits.argmax(-1) == labels).astype(np.float32)
    np.testing.assert_allclose(scalar, (correct * weights).sum() / weights.sum())
    np.testing.assert_allclose(per_instance, (correct * weights).sum(-1) / weights.sum(-1))


# --- NumPy float64 references ----------------------------------------------------------


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_means(values, weights):
    """(per-instance, scalar) weighted means; an instance with no weight gives 0."""
    weights = np.broadcast_to(np.asarray(weights, np.float64), values.shape)
    axes = tuple(range(1, values.ndim))
    weight_sums = weights.sum(axes)
    per_instance = (values * weights).sum(axes) / np.where(weight_sums > 0, weight_sums, 1.0)
    return per_instance, (values * weights).sum() / weights.sum()


def _np_soft(name, student, teacher, temperature):
    log_ps = _np_log_softmax(student / temperature)
    log_pt = _np_log_softmax(teacher / temperature)
    ps, pt = np.exp(log_ps), np.exp(log_pt)
    if name == "soft_cross_entropy":
        value = -(pt * log_ps).sum(-1)
    elif name == "kl_divergence":
        value = (pt * (log_pt - log_ps)).sum(-1)
    elif name == "reverse_kl":
        value = (ps * (log_ps - log_pt)).sum(-1)
    else:
        log_m = np.log((ps + pt) / 2)
        value = 0.5 * (ps * (log_ps - log_m)).sum(-1) + 0.5 * (pt * (log_pt - log_m)).sum(-1)
    return value * temperature**2


def _np_normalise(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_distribution_kl(student_scores, teacher_scores, pair_mask):
    """KL(teacher ‖ student) over valid keys per (b, h, q); NaN-free only on valid queries."""
    with np.errstate(invalid="ignore", divide="ignore"):
        log_ps = _np_log_softmax(np.where(pair_mask, student_scores, -np.inf))
        log_pt = _np_log_softmax(np.where(pair_mask, teacher_scores, -np.inf))
        terms = np.where(pair_mask, np.exp(log_pt) * (log_pt - log_ps), 0.0)
    kl = terms.sum(-1)
    query_valid = np.broadcast_to(pair_mask.any(-1), kl.shape)
    return _np_means(np.where(query_valid, kl, 0.0), query_valid)


SOFT_LOSSES = ["soft_cross_entropy", "kl_divergence", "reverse_kl", "jensen_shannon"]
HIDDEN_LOSSES = ["hidden_mse", "cosine_distance", "pkd"]


def _soft_inputs(shape, seed=1):
    rng = np.random.default_rng(seed)
    student = (rng.normal(size=shape) * 3).astype(np.float32)
    teacher = (rng.normal(size=shape) * 3).astype(np.float32)
    if len(shape) == 3:
        weights = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0.5, 0, 0, 0]], np.float32)
    else:
        weights = np.array([1, 0, 1], np.float32)
    return student, teacher, weights


# --- Soft-label losses -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4, 13), (3, 13)], ids=["BxMxV", "BxV"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("name", SOFT_LOSSES)
def test_soft_losses_match_numpy(name, temperature, shape):
    student, teacher, weights = _soft_inputs(shape)
    per_instance, scalar = getattr(losses, name)(student, teacher, weights, temperature=temperature)
    expected_per_instance, expected_scalar = _np_means(
        _np_soft(name, student, teacher, temperature), weights
    )
    assert per_instance.shape == (3,) and scalar.dtype == jnp.float32
    np.testing.assert_allclose(per_instance, expected_per_instance, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scalar, expected_scalar, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SOFT_LOSSES)
def test_temperature_squared_scaling_is_optional(name):
    student, teacher, weights = _soft_inputs((3, 4, 13))
    fn = getattr(losses, name)
    _, scaled = fn(student, teacher, weights, temperature=3.0)
    _, unscaled = fn(student, teacher, weights, temperature=3.0, scale_by_temperature_squared=False)
    np.testing.assert_allclose(scaled, 9.0 * unscaled, rtol=1e-6)


def test_logits_mse_matches_numpy():
    for shape in [(3, 4, 13), (3, 13)]:
        student, teacher, weights = _soft_inputs(shape)
        per_position = ((student.astype(np.float64) - teacher) ** 2).mean(-1)
        expected = _np_means(per_position, weights)
        actual = losses.logits_mse(student, teacher, weights)
        np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(actual[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_of_identical_logits_is_exactly_zero(temperature):
    logits, _, weights = _soft_inputs((3, 4, 13))
    for name in ["kl_divergence", "reverse_kl"]:
        per_instance, scalar = getattr(losses, name)(
            logits, logits.copy(), weights, temperature=temperature
        )
        assert float(scalar) == 0.0 and np.all(np.asarray(per_instance) == 0.0), name
    _, jsd = losses.jensen_shannon(logits, logits, weights, temperature=temperature)
    assert abs(float(jsd)) < 1e-6
    _, mse = losses.logits_mse(logits, logits, weights)
    assert float(mse) == 0.0


def test_soft_cross_entropy_of_identical_logits_is_the_entropy():
    logits, _, weights = _soft_inputs((3, 4, 13))
    log_p = _np_log_softmax(logits / 2.0)
    entropy = -(np.exp(log_p) * log_p).sum(-1) * 4.0
    _, scalar = losses.soft_cross_entropy(logits, logits, weights, temperature=2.0)
    np.testing.assert_allclose(scalar, _np_means(entropy, weights)[1], rtol=1e-5)


def test_divergences_are_non_negative_and_jsd_symmetric_and_bounded():
    rng = np.random.default_rng(7)
    # Peaked, disjoint distributions push JSD towards its ln 2 bound.
    student = (rng.normal(size=(4, 6, 17)) * 30).astype(np.float32)
    teacher = (rng.normal(size=(4, 6, 17)) * 30).astype(np.float32)
    for temperature in [1.0, 4.0]:
        for name in ["kl_divergence", "reverse_kl", "jensen_shannon"]:
            per_instance, _ = getattr(losses, name)(student, teacher, None, temperature=temperature)
            assert np.all(np.asarray(per_instance) >= 0.0), name
        forward, _ = losses.jensen_shannon(student, teacher, None, temperature=temperature)
        backward, _ = losses.jensen_shannon(teacher, student, None, temperature=temperature)
        np.testing.assert_allclose(forward, backward, rtol=1e-6, atol=1e-7)
        assert np.all(np.asarray(forward) <= np.log(2.0) * temperature**2 * (1 + 1e-6))
    one_hot = 1e4 * np.eye(5, dtype=np.float32)
    _, disjoint = losses.jensen_shannon(one_hot[None, :2], one_hot[None, 2:4], None)
    np.testing.assert_allclose(disjoint, np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("name", [*SOFT_LOSSES, "logits_mse"])
def test_masked_logits_contribute_nothing(name):
    student, teacher, weights = _soft_inputs((3, 4, 13))
    masked = (weights == 0)[..., None]
    garbage_student = np.where(masked, 1e4 * np.sign(student), student)
    garbage_teacher = np.where(masked, -3e3, teacher).astype(np.float32)
    fn = getattr(losses, name)
    expected = fn(student, teacher, weights)
    actual = fn(garbage_student, garbage_teacher, weights)
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(actual[1], expected[1], rtol=1e-6)


def test_weights_none_counts_every_position():
    student, teacher, _ = _soft_inputs((3, 4, 13))
    ones = np.ones((3, 4), np.float32)
    np.testing.assert_allclose(
        losses.kl_divergence(student, teacher, None)[1],
        losses.kl_divergence(student, teacher, ones)[1],
    )


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_scaled_kl_gradient_is_tau_times_probability_difference(temperature):
    """d(τ²·KL)/dz_s = τ·(p_s^τ − p_t^τ)·w / Σw: the τ² undoes the 1/τ of the softmax."""
    student, teacher, weights = _soft_inputs((3, 4, 13))
    grad = jax.grad(
        lambda z: losses.kl_divergence(z, teacher, weights, temperature=temperature)[1]
    )(student)
    ps = np.exp(_np_log_softmax(student / temperature))
    pt = np.exp(_np_log_softmax(teacher / temperature))
    expected = temperature * (ps - pt) * weights[..., None] / weights.sum()
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(grad))


def test_tau_squared_keeps_the_gradient_magnitude_comparable():
    """With τ² the gradient stays the same order for τ = 1 and τ = 4 (Hinton et al.):
    at large τ, τ·(p_s^τ − p_t^τ) ≈ (z_s − z_t − mean)/V, independent of τ; without
    the τ² factor the τ = 4 gradient would be 16× smaller."""
    student, teacher, weights = _soft_inputs((3, 4, 13))

    def grad_norm(temperature, scale=True):
        grad = jax.grad(
            lambda z: losses.kl_divergence(
                z, teacher, weights, temperature=temperature, scale_by_temperature_squared=scale
            )[1]
        )(student)
        return float(jnp.linalg.norm(grad))

    ratio = grad_norm(4.0) / grad_norm(1.0)
    assert 0.2 < ratio < 5.0, ratio
    np.testing.assert_allclose(grad_norm(4.0, scale=False) * 16.0, grad_norm(4.0), rtol=1e-5)


def test_temperature_can_be_traced():
    student, teacher, weights = _soft_inputs((3, 4, 13))
    for name in SOFT_LOSSES:
        fn = getattr(losses, name)
        jitted = jax.jit(lambda s, t, w, tau, fn=fn: fn(s, t, w, temperature=tau)[1])
        np.testing.assert_allclose(
            jitted(student, teacher, weights, jnp.float32(3.0)),
            fn(student, teacher, weights, temperature=3.0)[1],
            rtol=1e-6,
        )


def test_zero_teacher_probabilities_give_finite_loss_and_gradient():
    student, teacher, weights = _soft_inputs((3, 4, 13))
    teacher = teacher.copy()
    teacher[..., :5] = -np.inf  # p_t = 0 on part of the vocabulary.
    for name in ["kl_divergence", "soft_cross_entropy", "jensen_shannon"]:
        fn = getattr(losses, name)
        value, grad = jax.value_and_grad(lambda z, fn=fn: fn(z, teacher, weights)[1])(student)
        assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), name
    _, kl = losses.kl_divergence(student, teacher, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_pt = _np_log_softmax(teacher)
        terms = np.where(
            np.isfinite(log_pt), np.exp(log_pt) * (log_pt - _np_log_softmax(student)), 0
        )
    np.testing.assert_allclose(kl, _np_means(terms.sum(-1), weights)[1], rtol=1e-5)


def test_large_vocabulary_in_bfloat16_is_computed_in_float32():
    rng = np.random.default_rng(3)
    student = (rng.normal(size=(2, 3, 30522)) * 4).astype(np.float32)
    teacher = (rng.normal(size=(2, 3, 30522)) * 4).astype(np.float32)
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    student_bf16 = jnp.asarray(student, jnp.bfloat16)
    teacher_bf16 = jnp.asarray(teacher, jnp.bfloat16)
    per_instance, scalar = losses.kl_divergence(student_bf16, teacher_bf16, weights)
    assert per_instance.dtype == jnp.float32 and scalar.dtype == jnp.float32
    expected = _np_means(
        _np_soft(
            "kl_divergence",
            np.asarray(student_bf16, np.float32),
            np.asarray(teacher_bf16, np.float32),
            1.0,
        ),
        weights,
    )
    np.testing.assert_allclose(scalar, expected[1], rtol=1e-5)


def test_soft_losses_reject_bad_inputs():
    student, teacher, weights = _soft_inputs((3, 4, 13))
    with pytest.raises(ValueError, match="same shape"):
        losses.kl_divergence(student, teacher[..., :12], weights)
    with pytest.raises(ValueError, match="weights"):
        losses.kl_divergence(student, teacher, weights[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        losses.soft_cross_entropy(student, teacher, weights, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        losses.logits_mse(student, teacher[:2], weights)


# --- Representation losses -------------------------------------------------------------


def _hidden_inputs(width_s=8, width_t=8, seed=2):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(3, 5, width_s)).astype(np.float32)
    teacher = rng.normal(size=(3, 5, width_t)).astype(np.float32)
    token_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
    return student, teacher, token_mask


def _np_hidden(name, student, teacher):
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    if name == "hidden_mse":
        return ((student - teacher) ** 2).mean(-1)
    if name == "cosine_distance":
        return 1.0 - (_np_normalise(student) * _np_normalise(teacher)).sum(-1)
    return ((_np_normalise(student) - _np_normalise(teacher)) ** 2).mean(-1)


@pytest.mark.parametrize("name", HIDDEN_LOSSES)
def test_representation_losses_match_numpy(name):
    student, teacher, token_mask = _hidden_inputs()
    per_instance, scalar = getattr(losses, name)(student, teacher, token_mask)
    expected = _np_means(_np_hidden(name, student, teacher), token_mask)
    np.testing.assert_allclose(per_instance, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scalar, expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", HIDDEN_LOSSES)
def test_masked_tokens_contribute_nothing_to_representation_losses(name):
    student, teacher, token_mask = _hidden_inputs()
    masked = (token_mask == 0)[..., None]
    fn = getattr(losses, name)
    expected = fn(student, teacher, token_mask)
    actual = fn(np.where(masked, 1e3, student), np.where(masked, 0.0, teacher), token_mask)
    np.testing.assert_allclose(actual[1], expected[1], rtol=1e-6)
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-6)


def test_cosine_distance_of_identical_is_zero_and_of_negated_is_two():
    student, _, token_mask = _hidden_inputs()
    _, same = losses.cosine_distance(student, student, token_mask)
    _, opposite = losses.cosine_distance(student, -student, token_mask)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    np.testing.assert_allclose(opposite, 2.0, rtol=1e-6)


def test_pkd_is_invariant_to_positive_scaling():
    student, teacher, token_mask = _hidden_inputs()
    _, base = losses.pkd(student, teacher, token_mask)
    _, scaled_student = losses.pkd(37.0 * student, teacher, token_mask)
    _, scaled_teacher = losses.pkd(student, 0.01 * teacher, token_mask)
    np.testing.assert_allclose(scaled_student, base, rtol=1e-5)
    np.testing.assert_allclose(scaled_teacher, base, rtol=1e-5)


def test_normalised_losses_have_finite_gradients_at_zero_vectors():
    student, teacher, token_mask = _hidden_inputs()
    student[0, 3:] = 0.0  # Padding tokens whose hidden states are exactly 0.
    for name in ["cosine_distance", "pkd"]:
        fn = getattr(losses, name)
        grad = jax.grad(lambda h, fn=fn: fn(h, teacher, token_mask)[1])(student)
        assert np.all(np.isfinite(grad)), name


def test_representation_losses_require_equal_widths():
    student, teacher, token_mask = _hidden_inputs(width_s=6, width_t=8)
    for name in HIDDEN_LOSSES:
        with pytest.raises(ValueError, match="project the student"):
            getattr(losses, name)(student, teacher, token_mask)
    student, teacher, token_mask = _hidden_inputs()
    with pytest.raises(ValueError, match="weights"):
        losses.hidden_mse(student, teacher, token_mask[:, :4])


# --- Attention losses ------------------------------------------------------------------


def _attention_inputs(heads_s=2, heads_t=2, seed=4):
    rng = np.random.default_rng(seed)
    student = (rng.normal(size=(2, heads_s, 5, 5)) * 2).astype(np.float32)
    teacher = (rng.normal(size=(2, heads_t, 5, 5)) * 2).astype(np.float32)
    token_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    pair_mask = token_mask[:, :, None] & token_mask[:, None, :]
    pair_mask[1, 0, 4] = False  # A causal-style hole inside a real row.
    return student, teacher, pair_mask


@pytest.mark.parametrize("mask_rank", [3, 4])
def test_attention_score_mse_matches_numpy(mask_rank):
    student, teacher, pair_mask = _attention_inputs()
    mask = pair_mask if mask_rank == 3 else pair_mask[:, None]
    per_instance, scalar = losses.attention_score_mse(student, teacher, mask)
    squared = (student.astype(np.float64) - teacher) ** 2
    expected = _np_means(np.where(pair_mask[:, None], squared, 0.0), pair_mask[:, None])
    np.testing.assert_allclose(per_instance, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scalar, expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_rank", [3, 4])
def test_attention_distribution_kl_matches_numpy(mask_rank):
    student, teacher, pair_mask = _attention_inputs()
    mask = pair_mask if mask_rank == 3 else pair_mask[:, None]
    per_instance, scalar = losses.attention_distribution_kl(student, teacher, mask)
    expected = _np_distribution_kl(student, teacher, pair_mask[:, None])
    np.testing.assert_allclose(per_instance, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scalar, expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["attention_score_mse", "attention_distribution_kl"])
def test_attention_losses_are_zero_for_identical_and_ignore_masked_pairs(name):
    student, teacher, pair_mask = _attention_inputs()
    fn = getattr(losses, name)
    _, same = fn(student, student.copy(), pair_mask)
    assert float(same) == 0.0
    expected = fn(student, teacher, pair_mask)
    masked = ~pair_mask[:, None]
    garbage_student = np.where(masked, -np.inf, student).astype(np.float32)
    garbage_teacher = np.where(masked, 1e9, teacher).astype(np.float32)
    actual, grad = jax.value_and_grad(lambda s: fn(s, garbage_teacher, pair_mask)[1])(
        garbage_student
    )
    np.testing.assert_allclose(actual, expected[1], rtol=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(
        np.asarray(grad)[np.broadcast_to(masked, grad.shape)] == 0
    )


def test_attention_losses_reject_bad_inputs():
    student, teacher, pair_mask = _attention_inputs(heads_s=2, heads_t=4)
    for fn in [losses.attention_score_mse, losses.attention_distribution_kl]:
        with pytest.raises(ValueError, match="head"):
            fn(student, teacher, pair_mask)
        with pytest.raises(ValueError, match="mask"):
            fn(student, student, pair_mask[:, :4])


# --- Value relation --------------------------------------------------------------------


def _np_value_relation(student, teacher, token_mask, heads):
    def relation(x):
        batch, length, width = x.shape
        x = np.asarray(x, np.float64).reshape(batch, length, heads, width // heads)
        x = x.transpose(0, 2, 1, 3)
        return x @ x.transpose(0, 1, 3, 2) / np.sqrt(width // heads)

    pair_mask = (token_mask[:, :, None] & token_mask[:, None, :])[:, None]
    return _np_distribution_kl(relation(student), relation(teacher), pair_mask)


@pytest.mark.parametrize(("width_s", "width_t", "heads"), [(8, 12, 2), (6, 6, 3), (12, 8, 4)])
def test_value_relation_kl_matches_numpy_with_different_widths(width_s, width_t, heads):
    student, teacher, token_mask = _hidden_inputs(width_s, width_t)
    token_mask = token_mask.astype(bool)
    per_instance, scalar = losses.value_relation_kl(
        student, teacher, token_mask, num_relation_heads=heads
    )
    expected = _np_value_relation(student, teacher, token_mask, heads)
    np.testing.assert_allclose(per_instance, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scalar, expected[1], rtol=1e-5, atol=1e-5)


def test_value_relation_kl_is_zero_for_identical_and_ignores_padding():
    student, teacher, token_mask = _hidden_inputs(8, 12)
    _, same = losses.value_relation_kl(student, student.copy(), token_mask, num_relation_heads=4)
    assert float(same) == 0.0
    expected = losses.value_relation_kl(student, teacher, token_mask, num_relation_heads=4)
    padding = (token_mask == 0)[..., None]
    actual = losses.value_relation_kl(
        np.where(padding, 50.0, student),
        np.where(padding, -7.0, teacher),
        token_mask,
        num_relation_heads=4,
    )
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(actual[1], expected[1], rtol=1e-6)


def test_value_relation_kl_rejects_bad_inputs():
    student, teacher, token_mask = _hidden_inputs(8, 12)
    with pytest.raises(ValueError, match="divisible"):
        losses.value_relation_kl(student, teacher, token_mask, num_relation_heads=3)
    with pytest.raises(ValueError, match="positive"):
        losses.value_relation_kl(student, teacher, token_mask, num_relation_heads=0)
    with pytest.raises(ValueError, match="int"):
        losses.value_relation_kl(student, teacher, token_mask, num_relation_heads=2.0)
    with pytest.raises(ValueError, match="share"):
        losses.value_relation_kl(student, teacher[:, :4], token_mask, num_relation_heads=2)
    with pytest.raises(ValueError, match="token_mask"):
        losses.value_relation_kl(student, teacher, token_mask[:, :4], num_relation_heads=2)


# --- Layer maps ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("student_layers", "teacher_layers", "expected_teachers"),
    [
        (6, 4, (1, 2, 2, 3, 4, 4)),
        (4, 2, (1, 1, 2, 2)),
        (12, 6, (1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6)),
        (4, 4, (1, 2, 3, 4)),
        (6, 12, (2, 4, 6, 8, 10, 12)),
        (3, 4, (2, 3, 4)),
    ],
)
def test_uniform_layer_map_uses_the_ceiling(student_layers, teacher_layers, expected_teachers):
    expected = tuple(enumerate(expected_teachers, start=1))
    assert losses.uniform_layer_map(student_layers, teacher_layers) == ((0, 0), *expected)
    assert (
        losses.uniform_layer_map(student_layers, teacher_layers, include_embeddings=False)
        == expected
    )


def test_last_k_layer_map():
    assert losses.last_k_layer_map(6, 4, 2) == ((5, 3), (6, 4))
    assert losses.last_k_layer_map(4, 2, 2) == ((3, 1), (4, 2))
    assert losses.last_k_layer_map(12, 6, 1) == ((12, 6),)
    assert losses.last_k_layer_map(4, 4, 4) == ((1, 1), (2, 2), (3, 3), (4, 4))


def test_explicit_layer_map_is_validated_and_normalised():
    pairs = [[4, np.int64(2)], (0, 0), (2, 1)]
    assert losses.explicit_layer_map(pairs, 4, 2) == ((0, 0), (2, 1), (4, 2))
    assert losses.explicit_layer_map(((1, 2), (2, 2)), 6, 4) == ((1, 2), (2, 2))


@pytest.mark.parametrize(
    "call",
    [
        lambda: losses.uniform_layer_map(0, 4),
        lambda: losses.uniform_layer_map(6, -1),
        lambda: losses.uniform_layer_map(6.0, 4),
        lambda: losses.uniform_layer_map(True, 4),
        lambda: losses.last_k_layer_map(6, 4, 5),
        lambda: losses.last_k_layer_map(6, 4, 0),
        lambda: losses.last_k_layer_map(0, 4, 1),
        lambda: losses.explicit_layer_map([], 6, 4),
        lambda: losses.explicit_layer_map([(7, 1)], 6, 4),
        lambda: losses.explicit_layer_map([(1, 5)], 6, 4),
        lambda: losses.explicit_layer_map([(-1, 0)], 6, 4),
        lambda: losses.explicit_layer_map([(1, 1), (1, 2)], 6, 4),
        lambda: losses.explicit_layer_map([(1, 1, 1)], 6, 4),
        lambda: losses.explicit_layer_map([3], 6, 4),
        lambda: losses.explicit_layer_map([(1.5, 1)], 6, 4),
    ],
)
def test_layer_maps_reject_bad_input(call):
    with pytest.raises(ValueError):
        call()


def _autodiff_kl(student, teacher, weights, temperature):
    """The KL written plainly, differentiated by JAX (the hand-written VJP's reference)."""
    log_ps = jax.nn.log_softmax(student / temperature, -1)
    log_pt = jax.nn.log_softmax(teacher / temperature, -1)
    pt = jnp.exp(log_pt)
    terms = jnp.where(pt > 0, pt * (jnp.where(pt > 0, log_pt, 0) - log_ps), 0).sum(-1)
    return temperature**2 * (terms * weights).sum() / weights.sum()


def test_kl_gradients_in_all_inputs_match_autodiff():
    student, teacher, weights = _soft_inputs((3, 4, 13))
    masked = teacher.copy()
    masked[0, 0, :4] = -np.inf  # Zero teacher probabilities take the where() branch.

    def ours(s, t, tau):
        return losses.kl_divergence(s, t, weights, temperature=tau)[1]

    def reference(s, t, tau):
        return _autodiff_kl(s, t, weights, tau)

    # Every input, τ included; then the logits with p_t = 0 somewhere (τ's gradient
    # is NaN there under any implementation: d(-inf/τ)/dτ).
    for t, argnums in ((teacher, (0, 1, 2)), (masked, (0, 1))):
        args = (jnp.asarray(student), jnp.asarray(t), jnp.float32(1.7))
        got = jax.grad(ours, argnums=argnums)(*args)
        want = jax.grad(reference, argnums=argnums)(*args)
        for g, w in zip(got, want, strict=True):
            assert np.all(np.isfinite(g))
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7)


def test_cross_entropy_gradient_is_softmax_minus_one_hot(batch):
    logits, labels, weights = batch
    grad = jax.grad(lambda z: losses.mlm_cross_entropy(z, labels, weights)[1])(logits)
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    expected = shifted / shifted.sum(-1, keepdims=True) - np.eye(logits.shape[-1])[labels]
    expected *= (weights / weights.sum())[..., None]
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    # Second order through the hand-written backward is not needed; first order under jit
    # and vmap is.
    batched = jax.vmap(jax.grad(lambda z, y: losses.token_cross_entropy(z, y).sum()))
    np.testing.assert_allclose(
        batched(logits, labels).sum(0),
        jax.grad(lambda z: losses.token_cross_entropy(z, labels).sum())(logits).sum(0),
        rtol=1e-5,
        atol=1e-7,
    )
