"""What strategies declare, the per-step context, and the checks they own.

``make_strategy`` (``from_config``) must refuse every bad setting of a strategy, and
``check_setup`` every run it cannot train in, with a `ConfigError` that names the
field; the texts are the ones the config validators used to give.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dwt_jax.distill import (
    FINETUNE_STRATEGIES,
    MODES,
    PRETRAIN_STRATEGIES,
    STRATEGIES,
    StepContext,
    StrategySetup,
    Teachers,
    make_strategy,
)
from dwt_jax.errors import ConfigError

CLASSIFICATION_ONLY = {"mt_bert", "rl_kd", "dynamic_kd", "ca_mkd", "best_teacher"}


def strategy_of(name: str, **section: Any):
    return make_strategy(ml_collections.ConfigDict({"strategy": name, name: section}))


def dwt_config(**fields: Any) -> ml_collections.ConfigDict:
    """A valid DWT ``distill`` section with ``fields`` set (dotted keys reach into the
    schedule sections)."""
    config = {
        "strategy": "dwt",
        "form": "dwt",
        "alpha_h": 1.0,
        "alpha_s": {"name": "constant", "value": 1.0, "end_value": 1.0, "steps": 0},
        "tau": {"name": "constant", "value": 1.0, "end_value": 1.0, "steps": 0},
        "hidden_weight": 0.0,
        "hidden_loss": "mse",
        "hidden_layer_map": "uniform",
    }
    for name, value in fields.items():
        *sections, key = name.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[key] = value
    return ml_collections.ConfigDict(config)


def raises_exactly(message: str):
    return pytest.raises(ConfigError, match="^" + re.escape(message) + "$")


# --- Declarations ----------------------------------------------------------------------


def test_registries_follow_the_declared_mode():
    assert set(MODES) == {"pretrain", "finetune"}
    assert all(cls.mode in MODES for cls in STRATEGIES.values())
    assert set(PRETRAIN_STRATEGIES) == {"mlm", "clm", "dwt"}
    assert set(FINETUNE_STRATEGIES) == set(STRATEGIES) - {"mlm", "clm", "dwt"}
    assert all(cls.mode == "pretrain" for cls in PRETRAIN_STRATEGIES.values())
    assert all(cls.mode == "finetune" for cls in FINETUNE_STRATEGIES.values())
    assert {name for name, cls in STRATEGIES.items() if cls.name != name} == set()


def test_declared_needs():
    assert {n for n, cls in STRATEGIES.items() if cls.trains_ensemble} == {"cofinetune"}
    needs = {n for n, cls in STRATEGIES.items() if cls.needs_class_probabilities}
    assert needs == CLASSIFICATION_ONLY
    assert {n for n, cls in STRATEGIES.items() if cls.has_after_update} == {"rl_kd"}
    for name, cls in STRATEGIES.items():
        low, high = cls.num_teachers
        assert low >= 0 and (high is None or high >= low), name


def test_unknown_strategy_is_a_config_error():
    with raises_exactly(
        f"distill.strategy='bogus' is unknown; use one of {', '.join(sorted(STRATEGIES))}."
    ):
        make_strategy(ml_collections.ConfigDict({"strategy": "bogus"}))


# --- The per-step context ----------------------------------------------------------------


def test_step_context_crosses_jit_scan_and_grad():
    strategy = strategy_of("avg_teachers", kd="mse")
    rng = np.random.default_rng(0)
    student = rng.normal(size=(4, 3)).astype(np.float32)
    teacher = rng.normal(size=(4, 3)).astype(np.float32)
    batch = {"labels": np.array([0, 1, 2, 1], np.int32)}

    def loss(logits, ctx):
        teachers = Teachers(lambda _: [{"logits": teacher}], batch, [1])
        return strategy.loss({"logits": logits}, teachers, batch, ctx)[0]

    ctx = StepContext(step=jnp.int32(3), state={}, adapters={}, rng=jax.random.PRNGKey(0))
    eager = loss(student, ctx)
    np.testing.assert_allclose(jax.jit(loss)(student, ctx), eager, rtol=1e-6)
    grads = jax.grad(loss)(student, ctx)
    assert grads.shape == student.shape and np.all(np.isfinite(grads))

    def body(total, step):
        return total + loss(student, StepContext(step=step, rng=jax.random.PRNGKey(0))), None

    total, _ = jax.lax.scan(body, jnp.zeros(()), jnp.arange(2))
    np.testing.assert_allclose(total, 2 * eager, rtol=1e-6)
    leaves = jax.tree.leaves(ctx)
    assert len(leaves) == 2  # step and rng: empty state and adapters add none.


# --- check_setup ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "message"),
    [
        (
            "dwt",
            0,
            "distill.strategy='dwt' needs a teacher: list teacher workdirs in "
            "teacher.workdirs, or give a teacher.model section to train one first.",
        ),
        (
            "mlm",
            1,
            "teacher.workdirs lists 1 teacher(s) but distill.strategy='mlm' takes 0; "
            "clear teacher.workdirs.",
        ),
        (
            "mt_bert",
            0,
            "distill.strategy='mt_bert' needs teachers: set teacher.workdirs to a "
            "fine-tuned teacher run (e.g. the 'teachers' stage of the pipeline).",
        ),
        (
            "task",
            2,
            "distill.strategy='task' takes no teacher but teacher.workdirs is set; "
            "clear it or pick a distillation strategy.",
        ),
        (
            "cofinetune",
            1,
            "distill.strategy='cofinetune' takes no teacher but teacher.workdirs is set; "
            "clear it or pick a distillation strategy.",
        ),
    ],
)
def test_teacher_count_names_teacher_workdirs(name, count, message):
    strategy = dwt_config() if name == "dwt" else ml_collections.ConfigDict({"strategy": name})
    strategy = make_strategy(strategy)
    with raises_exactly(message):
        strategy.check_setup(StrategySetup(num_teachers=count))


@pytest.mark.parametrize(
    ("name", "counts"),
    [
        ("mlm", (0,)),
        ("dwt", (1,)),
        ("task", (0,)),
        ("cofinetune", (0,)),
        ("mt_bert", (1, 2, 5)),
        ("dynamic_kd", (1, 3)),
        ("rl_kd", (1, 2)),
    ],
)
def test_counts_in_range_pass(name, counts):
    config = dwt_config() if name == "dwt" else ml_collections.ConfigDict({"strategy": name})
    strategy = make_strategy(config)
    for count in counts:
        strategy.check_setup(StrategySetup(num_teachers=count))


@pytest.mark.parametrize("name", sorted(CLASSIFICATION_ONLY))
def test_class_probabilities_on_a_regression_task(name):
    strategy = strategy_of(name)
    with raises_exactly(
        f"distill.strategy={name!r} needs class probabilities, but data.task='glue/stsb' "
        "is a regression task; use 'task', 'avg_teachers', 'random_teacher' or "
        "'fixed_weights' with kd='mse'."
    ):
        strategy.check_setup(StrategySetup(num_teachers=2, is_regression=True, task="glue/stsb"))
    strategy.check_setup(StrategySetup(num_teachers=2, task="glue/sst2"))


@pytest.mark.parametrize(
    ("name", "section"),
    [
        ("avg_teachers", {}),
        ("random_teacher", {"kd": "ce"}),
        ("fixed_weights", {"weights": (1.0, 1.0)}),
    ],
)
def test_regression_needs_mse_kd(name, section):
    strategy = strategy_of(name, **section)
    kd = section.get("kd", "kl")
    with raises_exactly(
        f"distill.{name}.kd={kd!r} needs class probabilities, but data.task='glue/stsb' is "
        f"a regression task; set distill.{name}.kd='mse'."
    ):
        strategy.check_setup(StrategySetup(num_teachers=2, is_regression=True, task="glue/stsb"))
    strategy_of(name, **{**section, "kd": "mse"}).check_setup(
        StrategySetup(num_teachers=2, is_regression=True, task="glue/stsb")
    )


def test_after_update_takes_no_accumulation():
    strategy = strategy_of("rl_kd")
    with raises_exactly(
        "distill.strategy='rl_kd' updates its policy after every optimiser step; set "
        "optim.grad_accum_steps=1."
    ):
        strategy.check_setup(StrategySetup(num_teachers=2, grad_accum_steps=2))
    strategy.check_setup(StrategySetup(num_teachers=2, grad_accum_steps=1))
    strategy_of("mt_bert").check_setup(StrategySetup(num_teachers=2, grad_accum_steps=4))


def test_fixed_weights_need_one_weight_per_teacher():
    strategy = strategy_of("fixed_weights", weights=(0.2, 0.3, 0.5))
    with raises_exactly(
        "distill.fixed_weights.weights has 3 weights for 2 teachers; give one weight per "
        "teacher (teacher.workdirs)."
    ):
        strategy.check_setup(StrategySetup(num_teachers=2))
    strategy.check_setup(StrategySetup(num_teachers=3))
    # Two workdirs may hold three ensemble members: decided once they are counted.
    strategy.check_setup(StrategySetup(num_teachers=2, num_teachers_is_minimum=True))


def test_a_minimum_count_checks_only_what_it_decides():
    minimum = lambda count: StrategySetup(num_teachers=count, num_teachers_is_minimum=True)
    make_strategy(dwt_config()).check_setup(minimum(1))
    make_strategy(dwt_config()).check_setup(minimum(2))  # Several teachers, mixed per token.
    with raises_exactly(
        "distill.teacher_weights has 2 weights for 3 teachers; give one per teacher, in "
        "teacher.workdirs order."
    ):
        make_strategy(
            dwt_config(teacher_weighting="fixed", teacher_weights=(0.5, 0.5))
        ).check_setup(minimum(3))
    with raises_exactly(
        "distill.hidden_weight > 0 matches one teacher's hidden states; with 2 teachers set "
        "distill.hidden_weight=0."
    ):
        make_strategy(dwt_config(hidden_weight=1.0)).check_setup(minimum(2))
    with pytest.raises(ConfigError, match=r"takes no teacher but teacher\.workdirs is set"):
        strategy_of("task").check_setup(minimum(1))
    with pytest.raises(ConfigError, match=r"needs teachers: set teacher\.workdirs"):
        strategy_of("mt_bert").check_setup(minimum(0))
    strategy_of("mt_bert").check_setup(minimum(1))


def test_regression_baseline_with_mse_trains():
    """avg_teachers with kd='mse' on one score per example (C = 1): a finite loss, and
    no uncertainty metric (a score has no class distribution)."""
    strategy = strategy_of("avg_teachers", kd="mse")
    rng = np.random.default_rng(0)
    batch = {
        "labels": rng.normal(size=4).astype(np.float32),
        "example_weights": np.ones(4, np.float32),
    }
    outputs = [{"logits": rng.normal(size=(4, 1)).astype(np.float32)} for _ in range(2)]
    teachers = Teachers(lambda _: outputs, batch, [1, 2])
    student = rng.normal(size=(4, 1)).astype(np.float32)
    loss, metrics, _ = strategy.loss({"logits": student}, teachers, batch, StepContext())
    task = np.mean((student[:, 0] - batch["labels"]) ** 2)
    kd = np.mean([np.mean((student - o["logits"]) ** 2) for o in outputs])
    np.testing.assert_allclose(float(loss), task + kd, rtol=1e-5)
    assert "kd/mean_uncertainty" not in metrics
    for k, out in enumerate(outputs):
        want = np.mean((out["logits"][:, 0] - batch["labels"]) ** 2)
        np.testing.assert_allclose(float(metrics[f"kd/teacher{k}_task_loss"]), want, rtol=1e-5)


# --- DWT settings, checked by from_config ------------------------------------------------

SCHEDULE = "name, value, end_value, steps, warmup, start, margin, patience"
KNOWN = "constant, linear, ki, cosine, cutoff, strong_to_normal, wsd, phase, gap"

BAD_DWT = [
    ({"form": "strong"}, "distill.form='strong' is unknown; use one of dwt, ki."),
    ({"alpha_h": -1.0}, "distill.alpha_h=-1.0 must be a number in [0.0, 1000.0]."),
    ({"alpha_h": 1e4}, "distill.alpha_h=10000.0 must be a number in [0.0, 1000.0]."),
    ({"alpha_h": "1"}, "distill.alpha_h='1' must be a number in [0.0, 1000.0]."),
    (
        {"alpha_s": 3.0},
        "distill.alpha_s=3.0 must be a schedule section: {'name': 'constant', 'value': 1.0, "
        "'end_value': 1.0, 'steps': 0}.",
    ),
    ({"alpha_s.stepz": 5}, f"distill.alpha_s.stepz is not a schedule setting; use {SCHEDULE}."),
    ({"tau.Value": 5}, f"distill.tau.Value is not a schedule setting; use {SCHEDULE}."),
    (
        {"alpha_s.name": "sometimes"},
        f"distill.alpha_s.name='sometimes' is unknown; use one of {KNOWN}.",
    ),
    (
        {"alpha_s.value": -1.0},
        "distill.alpha_s.value=-1.0 must be in [0, 1000] (the KL weight: 1 = Normal, 4 = Strong).",
    ),
    (
        {"alpha_s.end_value": 1001.0},
        "distill.alpha_s.end_value=1001.0 must be in [0, 1000] (the KL weight: 1 = Normal, "
        "4 = Strong).",
    ),
    (
        {"form": "ki", "alpha_s.end_value": 1.5},
        "distill.alpha_s.end_value=1.5 must be in [0, 1] for distill.form='ki' ((1-α)·MLM + α·KL).",
    ),
    (
        {"form": "ki", "alpha_s.value": -0.1},
        "distill.alpha_s.value=-0.1 must be in [0, 1] for distill.form='ki' ((1-α)·MLM + α·KL).",
    ),
    (
        {"tau.value": 0.0},
        "distill.tau.value=0.0 must be in (0, 1000] (a temperature is positive).",
    ),
    (
        {"tau.end_value": -2.0},
        "distill.tau.end_value=-2.0 must be in (0, 1000] (a temperature is positive).",
    ),
    (
        {"tau.value": 1e4},
        "distill.tau.value=10000.0 must be in (0, 1000] (a temperature is positive).",
    ),
    (
        {"tau.name": "ki", "tau.steps": 5},
        "distill.tau.name='ki' takes the temperature to 0; use constant, linear, cosine or "
        "strong_to_normal.",
    ),
    (
        {"tau.name": "cutoff", "tau.steps": 5},
        "distill.tau.name='cutoff' takes the temperature to 0; use constant, linear, cosine "
        "or strong_to_normal.",
    ),
    (
        {"alpha_s.name": "cosine"},
        "distill.alpha_s.steps=0: schedule 'cosine' needs the step at which it reaches its "
        "end; set distill.alpha_s.steps > 0 (or distill.alpha_s.name='constant').",
    ),
    (
        {"tau.name": "linear", "tau.steps": -3},
        "distill.tau.steps=-3: schedule 'linear' needs the step at which it reaches its "
        "end; set distill.tau.steps > 0 (or distill.tau.name='constant').",
    ),
    ({"hidden_weight": -1.0}, "distill.hidden_weight=-1.0 must be a number in [0.0, 1000.0]."),
    ({"hidden_weight": 2e3}, "distill.hidden_weight=2000.0 must be a number in [0.0, 1000.0]."),
    (
        {"hidden_weight": 1.0, "hidden_loss": "l1"},
        "distill.hidden_loss='l1' is unknown; use one of mse, pkd, cosine.",
    ),
    (
        {"hidden_weight": 1.0, "hidden_layer_map": "middle"},
        "distill.hidden_layer_map='middle' is unknown; use one of uniform, last.",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD_DWT, ids=[m.split("=")[0] for _, m in BAD_DWT])
def test_bad_dwt_setting_is_refused_by_make_strategy(fields, message):
    with raises_exactly(message):
        make_strategy(dwt_config(**fields))


@pytest.mark.parametrize("key", ["name", "value"])
def test_missing_schedule_key_is_named(key):
    config = dwt_config()
    del config.alpha_s[key]
    with raises_exactly(f"distill.alpha_s.{key} is missing; set it (see configs/base.py)."):
        make_strategy(config)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"form": "ki", "alpha_s": {"name": "ki", "value": 1.0, "steps": 100}},
        {"alpha_s": {"name": "strong_to_normal", "value": 4.0, "end_value": 1.0, "steps": 10}},
        {"tau": {"name": "cosine", "value": 2.0, "end_value": 1.0, "steps": 10}},
        {"alpha_h": 0, "hidden_weight": 0.5, "hidden_loss": "pkd", "hidden_layer_map": "last"},
        {"alpha_s.value": 1000.0, "tau.value": 1000.0},
    ],
)
def test_good_dwt_settings_build(fields):
    strategy = make_strategy(dwt_config(**fields))
    strategy.check_setup(StrategySetup(num_teachers=1))
