"""The main job: a run, or a pipeline of stages (teacher → student → baseline).

`dwt_jax.stages` plans the stages a config asks for; each stage's config is then
checked exactly once, by its run kind (`dwt_jax.train.PRETRAIN`,
`dwt_jax.finetune.run.FINETUNE`), into a `RunPlan` — every stage before the first
one starts, so a mistake in the last stage is found before the first trains. The
plans run in order through `dwt_jax.driver.execute`; every stage resumes on its
own, so rerunning the command after a stop continues where it stopped.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from dwt_jax import loop, speedup, stages
from dwt_jax.config_files import fields_as_in, is_finetune
from dwt_jax.driver import Produced, RunKind, RunPlan, execute
from dwt_jax.errors import ConfigError
from dwt_jax.finetune.run import FINETUNE
from dwt_jax.metrics import read_metrics
from dwt_jax.objectives import objective_for
from dwt_jax.schema import model_config, validate_types
from dwt_jax.stages import Stage, plan_stages
from dwt_jax.train import PRETRAIN

SUMMARY_FILE = "summary.json"
__all__ = ["SUMMARY_FILE", "check_stages", "kind_of", "plan_stages", "run", "run_stages"]


def kind_of(config: ml_collections.ConfigDict) -> RunKind:
    """The run kind of a (stage) config: fine-tuning (``mode='finetune'``) or
    pre-training."""
    return FINETUNE if is_finetune(config) else PRETRAIN


def _produced_by(stage_list: list[Stage]) -> dict[str, Produced]:
    """The runs the stages make: workdir → (kind, config, the user's field for it)."""
    return {  # The produced model's section, as the user's config names it.
        os.path.abspath(stage_dir): Produced(
            kind_of(config).mode, config, stages.user_fields("model.", name).removesuffix(".")
        )
        for name, config, stage_dir in stage_list
    }


def check_stages(stage_list: list[Stage]) -> list[tuple[str, RunPlan]]:
    """Checks every stage (config, the runs it names, its data) into its plan, once,
    before the first one starts; errors name the field as the user wrote it."""
    produced = _produced_by(stage_list)
    plans = []
    for index, (name, stage_config, stage_dir) in enumerate(stage_list):
        earlier = dict(list(produced.items())[:index])  # Only earlier stages make runs.
        try:
            plans.append((name, kind_of(stage_config).check(stage_config, stage_dir, earlier)))
        except ConfigError as e:
            where = f" (in the {name} stage)" if len(stage_list) > 1 else ""
            raise ConfigError(f"{stages.user_fields(str(e), name)}{where}") from None
    return plans


def run_plans(plans: list[tuple[str, RunPlan]]) -> dict[str, loop.RunResult]:
    """Runs checked plans in order (each resumes on its own); stops after a stage that
    was interrupted."""
    results: dict[str, loop.RunResult] = {}
    for name, plan in plans:
        if len(plans) > 1 and jax.process_index() == 0:
            print(f"dwt_jax: stage '{name}' in {plan.workdir}", flush=True)
        results[name] = execute(plan)
        if results[name].interrupted:
            break
    return results


def run_stages(stage_list: list[Stage]) -> dict[str, loop.RunResult]:
    """Checks every stage, then runs them in order."""
    return run_plans(check_stages(stage_list))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, loop.RunResult]:
    """Runs every stage (resuming finished or partial ones); returns their results."""
    loop.check_workdir(workdir)
    with fields_as_in(config, kind_of(config).reference):
        validate_types(config)  # The kinds of the values the planning reads.
        stage_list = plan_stages(config, workdir)
    results = run_stages(stage_list)
    if len(stage_list) > 1 and not any(r.interrupted for r in results.values()):
        if is_finetune(config):
            _write_finetune_summary(workdir, results)
        else:
            _write_summary(workdir, results, config)
    return results


def _write_finetune_summary(workdir: str, results: dict[str, loop.RunResult]) -> None:
    """Prints and saves the task metrics of the teachers, the student and the baseline."""
    rows: dict[str, dict[str, float]] = {}
    for name, result in results.items():
        if name.startswith("pretrain"):
            continue
        metrics = result.eval_metrics
        if name == "teachers":
            members = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/teacher")})
            for member in members:
                prefix = f"eval/{member}/"
                rows[member] = {
                    f"eval/{k[len(prefix) :]}": v
                    for k, v in metrics.items()
                    if k.startswith(prefix)
                }
            rows["teachers (ensemble)"] = {
                k: v for k, v in metrics.items() if k.count("/") == 1 and k.startswith("eval/")
            }
        else:
            rows[name] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    names = sorted({k for m in rows.values() for k in m})
    widths = [max(14, len(n) - 5 + 2) for n in names]  # Room for every metric's name.
    header = f"{'model':<22}" + "".join(f"{n[5:]:>{w}}" for n, w in zip(names, widths, strict=True))
    lines = [header] + [
        f"{name:<22}"
        + "".join(f"{m.get(n, float('nan')):>{w}.4f}" for n, w in zip(names, widths, strict=True))
        for name, m in rows.items()
    ]
    if jax.process_index() == 0:
        print("\n".join(lines), flush=True)
        with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
            json.dump(rows, f, indent=2, sort_keys=True)


def _write_summary(
    workdir: str, results: dict[str, loop.RunResult], config: ml_collections.ConfigDict
) -> None:
    """Prints and saves the held-out metrics of every stage side by side."""
    rows = {
        name: {k: v for k, v in result.eval_metrics.items() if k.startswith("eval/")}
        for name, result in results.items()
    }
    if "teacher" not in rows and "student" in rows:  # A given teacher: as the student saw it.
        seen = results["student"].eval_metrics
        rows = {
            "teacher": {f"eval/{k[8:]}": v for k, v in seen.items() if k.startswith("teacher/")},
            **rows,
        }
    objective = objective_for(model_config(config.model))
    columns = objective.summary_columns
    lines = [f"{'stage':<10}" + "".join(f" {title:>14}" for _, title, _ in columns)]
    lines += [
        f"{name:<10}" + "".join(f" {m.get(key, float('nan')):>14{fmt}}" for key, _, fmt in columns)
        for name, m in rows.items()
    ]
    if "student" in rows and "baseline" in rows:  # The compute the teacher saved.
        key = f"eval/{objective.eval_loss}"
        found = speedup.speedup(
            read_metrics(os.path.join(workdir, "student")),
            read_metrics(os.path.join(workdir, "baseline")),
            key,
        )
        rows["student"].update(
            {f"speedup/{k}": v for k, v in found.items() if v is not None and k != "target"}
        )
        lines.append(speedup.describe(found, key))
    if jax.process_index() == 0:
        print("\n".join(lines), flush=True)
        with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
            json.dump(rows, f, indent=2, sort_keys=True)
