"""Every fine-tuning strategy side by side on one task, with the same teachers.

    python -m dwt_jax.finetune.compare --config=configs/finetune/base.py --workdir=DIR
    python -m dwt_jax.finetune.compare --config=configs/finetune/base.py:smoke \
        --workdir=/tmp/cmp --config.compare.strategies="('task','dynamic_kd')"
    # A GLUE task prepared with TFDS:
    python -m dwt_jax.finetune.compare --config=configs/finetune/base.py --workdir=DIR \
        --config.data.source=tfds --config.data.task=glue/rte

Pre-trains the encoders and co-finetunes the teachers once (as the fine-tuning
pipeline does), then fine-tunes one student per entry of ``compare.strategies`` in
``DIR/students/<entry>``. Every stage resumes, so a rerun after a stop continues.
Writes ``comparison.md`` / ``comparison.json`` (the task's metrics, wall time, and the
teachers' and student's model FLOPs per step, so the saving of Dynamic KD's data
selection shows) and ``weights_vs_uncertainty.png`` (each teacher's weight against
the student's mean uncertainty over training, for strategies that weight teachers).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections

from dwt_jax import cli, experiment, flops
from dwt_jax.configuration import ConfigError
from dwt_jax.data import classification
from dwt_jax.distill import weighting
from dwt_jax.finetune import run as finetune_run
from dwt_jax.metrics import read_metrics
from dwt_jax.stages import Stage, plan_comparison

REPORT_MD = "comparison.md"
REPORT_JSON = "comparison.json"
WEIGHTS_PNG = "weights_vs_uncertainty.png"
TIMING_FILE = "timing.json"


def _teacher_configs(stage: ml_collections.ConfigDict, task: Any) -> list[Any]:
    """The member configs of the stage's teachers (from their saved run configs)."""
    configs = []
    for i, workdir in enumerate(stage.teacher.workdirs):
        _, members, _ = finetune_run.plan_finetuned_teacher(workdir, f"teacher.workdirs[{i}]", task)
        configs.extend(members)
    return configs


def teacher_rows_fraction(stage: ml_collections.ConfigDict) -> float:
    """The fraction of each batch the teachers run on (Dynamic KD's data selection)."""
    if stage.distill.strategy != "dynamic_kd":
        return 1.0
    section = stage.distill.get("dynamic_kd", {})
    if section.get("selection", "none") == "none":
        return 1.0
    batch = int(stage.data.batch_size)
    return weighting.num_selected(batch, float(section.get("ratio", 1.0))) / batch


def step_flops(stage: ml_collections.ConfigDict) -> dict[str, float]:
    """Model FLOPs per step: the student's forward+backward and the teachers' forward."""
    task = classification.task_from_config(stage.data)
    batch, seq_len = int(stage.data.batch_size), int(stage.data.seq_len)
    student = finetune_run.model_config(stage.model, task.num_labels, "model")
    teacher_flops = 0.0
    if stage.teacher.workdirs:
        rows = teacher_rows_fraction(stage) * batch
        teacher_flops = sum(
            flops.classifier_forward_flops(cfg, 1, seq_len) * rows
            for cfg in _teacher_configs(stage, task)
        )
    return {
        "student_flops": float(flops.train_step_flops(student, batch, seq_len)),
        "teacher_flops": float(teacher_flops),
    }


def _run_timed(name: str, stage: ml_collections.ConfigDict, stage_dir: str) -> Any:
    """Runs one stage; records its wall time the first time it trains to the end."""
    start = time.monotonic()
    result = experiment.run_stages([(name, stage, stage_dir)])[name]
    elapsed = time.monotonic() - start
    path = os.path.join(stage_dir, TIMING_FILE)
    trained = result.final_step - result.start_step
    if trained > 0 and not result.interrupted and jax.process_index() == 0:
        timing = {"wall_s": elapsed, "steps": trained, "s_per_step": elapsed / trained}
        if result.start_step > 0 and os.path.exists(path):  # Resumed: add to what it had.
            with open(path) as f:
                before = json.load(f)
            timing["wall_s"] += before.get("wall_s", 0.0)
            timing["steps"] += before.get("steps", 0)
            timing["s_per_step"] = timing["wall_s"] / timing["steps"]
        with open(path, "w") as f:
            json.dump(timing, f)
    return result


def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains every stage (resuming), then writes and returns the report.

    A workdir that cannot be used is refused (``ConfigError``) before anything is
    printed or written."""
    cli.check_workdir(workdir)
    entries = tuple(config.compare.strategies)
    stages = plan_comparison(config, workdir, entries)
    experiment.check_stages(stages)  # Every config is checked before the first step.
    results = {}
    for name, stage, stage_dir in stages:
        print(f"dwt_jax.compare: stage '{name}' in {stage_dir}", flush=True)
        results[name] = _run_timed(name, stage, stage_dir)
        if results[name].interrupted:
            return {"interrupted": True}
    report = build_report(config, stages[-len(entries) :], results)
    if jax.process_index() == 0:
        write_report(report, workdir)
    print(report["markdown"], flush=True)
    return report


def _timing(stage_dir: str) -> dict[str, float]:
    path = os.path.join(stage_dir, TIMING_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def build_report(
    config: ml_collections.ConfigDict,
    student_stages: list[Stage],
    results: dict[str, Any],
) -> dict[str, Any]:
    """The rows of the comparison and its markdown table."""
    task = classification.task_from_config(config.data)
    rows = []
    teacher_scores: dict[str, float] = {}
    for name, stage, stage_dir in student_stages:
        metrics = results[name].eval_metrics
        for key, value in metrics.items():
            if key.startswith("teacher") and key.endswith(f"/{task.main_metric}"):
                teacher_scores[key.split("/")[0]] = value
        rows.append(
            {
                "entry": name,
                "strategy": stage.distill.strategy,
                "metrics": {
                    k[5:]: v
                    for k, v in metrics.items()
                    if k.startswith("eval/") and "/" not in k[5:]
                },
                **_timing(stage_dir),
                **step_flops(stage),
                "teacher_rows_fraction": teacher_rows_fraction(stage),
                "workdir": stage_dir,
            }
        )
    names = [m for m in task.metrics]
    header = (
        "| entry | strategy | "
        + " | ".join(names)
        + " | wall time (s) | s/step | teacher GFLOPs/step | student GFLOPs/step |"
    )
    lines = [header, "|" + "---|" * (len(names) + 6)]
    for row in rows:
        values = " | ".join(f"{row['metrics'].get(n, float('nan')):.4f}" for n in names)
        wall = f"{row['wall_s']:.0f}" if "wall_s" in row else "–"
        per_step = f"{row['s_per_step']:.3f}" if "s_per_step" in row else "–"
        lines.append(
            f"| {row['entry']} | {row['strategy']} | {values} | {wall} | {per_step} | "
            f"{row['teacher_flops'] / 1e9:.2f} | {row['student_flops'] / 1e9:.2f} |"
        )
    settings = (
        f"Task {task.name} ({task.main_metric} on the "
        f"{classification.eval_split_name(config.data)} split); "
        f"student {config.model.num_layers}L/{config.model.hidden_size}, "
        f"{config.train.num_steps} steps of batch {config.data.batch_size} × "
        f"{config.data.seq_len} tokens, lr {config.optim.learning_rate}, seed {config.seed}; "
        f"teachers "
        + ", ".join(
            f"{m['num_layers']}L/{m['hidden_size']}" for m in config.teacher.models.__iter__()
        )
        + (
            f" co-finetuned for {config.teacher.num_steps} steps"
            if not config.teacher.workdirs
            else ""
        )
        + (
            "; teachers' "
            + task.main_metric
            + ": "
            + ", ".join(f"{k} {v:.4f}" for k, v in sorted(teacher_scores.items()))
            if teacher_scores
            else ""
        )
        + "."
    )
    markdown = "\n".join([settings, "", *lines]) + "\n"
    return {"task": task.name, "settings": settings, "rows": rows, "markdown": markdown}


def _weight_series(workdir: str) -> dict[str, list[float]]:
    series: dict[str, list[float]] = {}
    for record in read_metrics(workdir):
        if "kd/mean_uncertainty" not in record:
            continue
        for key, value in record.items():
            if key.startswith("kd/weight_teacher") or key in ("step", "kd/mean_uncertainty"):
                series.setdefault(key, []).append(float(value))
    return series


def write_report(report: dict[str, Any], workdir: str) -> None:
    """comparison.md, comparison.json and the weight-vs-uncertainty plot."""
    with open(os.path.join(workdir, REPORT_MD), "w") as f:
        f.write(report["markdown"])
    with open(os.path.join(workdir, REPORT_JSON), "w") as f:
        json.dump({k: v for k, v in report.items() if k != "markdown"}, f, indent=1)
    panels = []
    for row in report["rows"]:
        series = _weight_series(row["workdir"])
        teachers = sorted(k for k in series if k.startswith("kd/weight_teacher"))
        if teachers and len(series.get("step", [])) > 1:
            panels.append((row["entry"], series, teachers))
    if not panels:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False, layout="constrained"
    )
    markers = "o^sDv<>p"
    points = None
    for ax, (title, series, teachers) in zip(axes.flat, panels, strict=False):
        uncertainty = series["kd/mean_uncertainty"]
        for index, key in enumerate(teachers):
            ax.plot(uncertainty, series[key], lw=0.4, alpha=0.4, color="grey")
            points = ax.scatter(
                uncertainty,
                series[key],
                c=series["step"],
                s=12,
                cmap="viridis",
                marker=markers[index % len(markers)],
                label=key.split("/")[1].replace("weight_", ""),
            )
        ax.set(title=title, xlabel="student mean uncertainty u", ylabel="teacher weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.colorbar(points, ax=axes.ravel().tolist(), label="step", shrink=0.8)
    fig.savefig(os.path.join(workdir, WEIGHTS_PNG), dpi=110)
    plt.close(fig)


_EXAMPLES = {"config": "configs/finetune/base.py", "workdir": "runs/compare"}


def main(argv: list[str]) -> None:
    """CLI: flags → run_comparison; ``cli.run`` turns a ``ConfigError`` into one line
    and exit 2; 130 if stopped."""
    from absl import flags

    del argv  # The flag parser refused positional arguments.
    config = flags.FLAGS.config
    if not finetune_run.is_finetune(config):
        raise ConfigError(
            f"--config={cli.flag_value(sys.argv, 'config')} is not a fine-tuning config "
            "(mode='finetune'); use configs/finetune/base.py."
        )
    report = run_comparison(config, flags.FLAGS.workdir)
    if report.get("interrupted"):
        sys.exit(130)


def _define_flags() -> None:
    """The CLI's flags (defined only when run, so importing this module defines none)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A fine-tuning config, e.g. ':smoke'.")
    flags.DEFINE_string("workdir", None, "Directory of the comparison's runs and report.")
    flags.mark_flags_as_required(["config", "workdir"])


def run_cli() -> None:
    """The entry point of ``python -m dwt_jax.finetune.compare``."""
    _define_flags()
    cli.run(main, _EXAMPLES, config_flag="config")


if __name__ == "__main__":
    run_cli()
