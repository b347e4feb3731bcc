"""The study's report: each run's numbers, each row over its seeds, the per-factor
lines, "what this shows", the markdown, the JSON and the plots."""

from __future__ import annotations

import json
import os
from typing import Any

from dwt_jax import speedup
from dwt_jax.metrics import read_metrics
from dwt_jax.study.compare import compare, paired_interval, verdict
from dwt_jax.study.plan import (
    BASELINE,
    FACTOR_TITLES,
    FACTORS,
    REPORT_JSON,
    REPORT_MD,
    SCHEDULES_PNG,
    WEIGHTS_PNG,
    StudyPlan,
    alpha_label,
)


def eval_lines(run_dir: str, metric: str) -> dict[int, dict[str, Any]]:
    """Held-out evaluations by step (the last line wins if a resume repeated a step)."""
    return {line["step"]: line for line in read_metrics(run_dir) if metric in line}


def _summary(plan: StudyPlan, name: str, early_fraction: float) -> dict[str, Any]:
    """One run's early and final held-out numbers, its curves and (a student's) steps to
    its seed's baseline's final loss."""
    run = plan.runs[name]
    loss_key = plan.metric
    acc_key = f"eval/{plan.objective.eval_accuracy}"
    lines = read_metrics(plan.path(name))
    evals = eval_lines(plan.path(name), loss_key)
    num_steps = run.config.train.num_steps
    early_step = min(s for s in evals if s >= early_fraction * num_steps)
    schedule = {int(line["step"]): line for line in lines if "distill/alpha" in line}

    def series(lines_by_step: dict[int, dict], **keys: str) -> dict[str, list]:
        steps = sorted(lines_by_step)
        return {"step": steps} | {k: [lines_by_step[s][m] for s in steps] for k, m in keys.items()}

    reach = None
    task_accuracy = None
    if name in plan.downstream:  # Its fine-tuning on the classification task, if done.
        task = plan.downstream[name]
        finals = eval_lines(plan.path(task.name), "eval/accuracy")
        if task.config.train.num_steps in finals:
            task_accuracy = finals[task.config.train.num_steps]["eval/accuracy"]
    teachers = [] if run.teacher is None else [run.teacher, *run.more_teachers]
    if run.teacher is not None:  # A student: the compute its teacher saved.
        reach = speedup.speedup(lines, read_metrics(plan.path(run.baseline)), loss_key)
    return {
        "run": name,
        "group": run.group or name,
        "seed": int(run.config.seed),
        "teacher": run.teacher,
        "teachers": [t.removesuffix(f"_seed{run.config.seed}") for t in teachers],
        "weights_by_uncertainty": weights_by_uncertainty(lines, len(teachers))
        if len(teachers) > 1
        else None,
        "alpha": run.alpha,
        "alpha_label": alpha_label(run),
        "init": run.init or run.config.teacher.student_init,
        "layers": run.config.model.num_layers,
        "hidden": run.config.model.hidden_size,
        "early_step": early_step,
        "early_loss": evals[early_step][loss_key],
        "early_accuracy": evals[early_step][acc_key],
        "final_step": num_steps,
        "final_loss": evals[num_steps][loss_key],
        "final_accuracy": evals[num_steps][acc_key],
        "task_accuracy": task_accuracy,
        "steps_to_baseline": None if reach is None else reach["student_steps"],
        "charged_steps": run.charged,
        "time_to_baseline": None if reach is None else reach["time_ratio"],
        "curve": series(evals, loss=loss_key, accuracy=acc_key),
        "schedule": series(schedule, alpha="distill/alpha", tau="distill/tau"),
    }


_STATS = ("early_loss", "early_accuracy", "final_loss", "final_accuracy")


def weights_by_uncertainty(lines: list[dict[str, Any]], num_teachers: int) -> dict[str, list]:
    """Each teacher's mean per-token weight in each quarter of the student's uncertainty
    ([0, ¼), …, [¾, 1]) over the whole run: the per-step bin means weighted by the share
    of tokens in the bin (``distill/weight{k}_u{b}``, ``distill/u{b}_share``)."""
    from dwt_jax.distill.teacher_mix import UNCERTAINTY_BINS

    out: dict[str, list] = {
        "bin_center": [(b + 0.5) / UNCERTAINTY_BINS for b in range(UNCERTAINTY_BINS)]
    }
    shares = [
        sum(line.get(f"distill/u{b}_share", 0.0) for line in lines) for b in range(UNCERTAINTY_BINS)
    ]
    total = sum(shares) or 1.0
    out["share"] = [x / total for x in shares]
    for k in range(num_teachers):
        out[f"teacher{k}"] = [
            sum(
                line.get(f"distill/weight{k}_u{b}", 0.0) * line.get(f"distill/u{b}_share", 0.0)
                for line in lines
            )
            / shares[b]
            if shares[b] > 0
            else None
            for b in range(UNCERTAINTY_BINS)
        ]
    return out


def aggregate(members: list[dict[str, Any]]) -> dict[str, Any]:
    """A group's row over its seeds: the first seed's descriptive fields, the mean of
    every number, its spread (max − min), and the steps to the baseline's quality (the
    mean over the seeds that got there, and how many did)."""
    row = {k: v for k, v in members[0].items() if k not in ("curve", "schedule", "seed")}
    row["run"], row["seeds"] = members[0]["group"], len(members)
    for key in _STATS:
        values = [m[key] for m in members]
        row[key] = sum(values) / len(values)
        row[f"{key}_spread"] = max(values) - min(values)
        row[f"{key}_by_seed"] = {m["seed"]: m[key] for m in members}
    tasks = [m.get("task_accuracy") for m in members]
    known = [t for t in tasks if t is not None]
    row["task_accuracy"] = sum(known) / len(known) if known and None not in tasks else None
    row["task_accuracy_spread"] = max(known) - min(known) if row["task_accuracy"] else None
    if row["task_accuracy"] is not None:
        row["task_accuracy_by_seed"] = {m["seed"]: m["task_accuracy"] for m in members}
    reached = [m["steps_to_baseline"] for m in members if m["steps_to_baseline"] is not None]
    row["steps_to_baseline"] = sum(reached) / len(reached) if reached else None
    row["charged_steps"] = members[0].get("charged_steps", 0)
    row["reached_baseline"] = len(reached)
    times = [m["time_to_baseline"] for m in members if m["time_to_baseline"] is not None]
    row["time_to_baseline"] = sum(times) / len(times) if times else None
    return row


def _task_cell(row: dict[str, Any]) -> str:
    if row.get("task_accuracy") is None:
        return "—"
    spread = row.get("task_accuracy_spread") or 0.0
    return f"{row['task_accuracy']:.4f}" + (f" ±{spread / 2:.4f}" if row["seeds"] > 1 else "")


def _delta_cell(row: dict[str, Any]) -> str:
    """Δ final loss vs the baseline, with its paired 95% half-width over the seeds."""
    half = row.get("delta_vs_baseline_95")
    return f"{row['delta_vs_baseline']:+.4f}" + (f" ±{half:.4f}" if half is not None else "")


def _best_line(title: str, rows: list[dict[str, Any]], baseline: dict[str, Any], what: str) -> str:
    """Which run of a factor had the lowest held-out loss, early and at the end."""
    final = min(rows, key=lambda r: r["final_loss"])
    early = min(rows, key=lambda r: r["early_loss"])
    better = sum(r["final_loss"] < baseline["final_loss"] for r in rows)
    return (
        f"- **{title}**: lowest final held-out {what}: `{final['run']}` "
        f"({final['final_loss']:.4f}, {final['final_loss'] - baseline['final_loss']:+.4f} vs "
        f"baseline); lowest at step {early['early_step']}: `{early['run']}` "
        f"({early['early_loss']:.4f}; baseline {baseline['early_loss']:.4f}); "
        f"{better} of {len(rows)} below the baseline's final loss."
    )


def _teacher_label(teacher: dict[str, Any], student_steps: int) -> str:
    """A teacher's shape (and length when it differs from the student's) and its own loss."""
    steps = "" if teacher["final_step"] == student_steps else f" ({teacher['final_step']} steps)"
    return f"{teacher['layers']}×{teacher['hidden']}{steps}: {teacher['final_loss']:.4f}"


def _findings(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> list[str]:
    """'What this shows': each factor's result set against the papers' findings
    (docs/methods.md#papers-numbers), in plain words; numbers are the report's."""
    lines = []
    by_factor = {key: [r for r in rows if r["factor"] == key] for key, _, _ in FACTORS}
    quality = by_factor["teacher_quality"]
    if quality:
        weaker = [r for r in quality if r["teacher_final_loss"] > baseline["final_loss"]]
        early = [compare(r, baseline, "early_loss") for r in quality]
        below = sum(side == "below" for side, _ in early)
        final = [compare(r, baseline, "final_loss") for r in quality]
        lines.append(
            f"- **Teacher quality.** {len(weaker)} of {len(quality)} teachers end weaker than "
            f"the student alone ({baseline['final_loss']:.4f}). Early (step "
            f"{baseline['early_step']}), {below} of {len(quality)} DWT students are below the "
            "baseline ("
            + "; ".join(f"`{r['run']}` {text}" for r, (_, text) in zip(quality, early, strict=True))
            + "). The DWT paper and SALT say a weaker teacher speeds a larger student up "
            f"early: {verdict(below == len(quality), [s for s, _ in early])}. At the end: "
            + "; ".join(f"`{r['run']}` {t}" for r, (_, t) in zip(quality, final, strict=True))
            + ". Gemma 3 found small teachers best over short horizons only: a student above "
            "the baseline at the end with a weak teacher is that finding."
        )
    alpha = by_factor["alpha"]
    if alpha:
        best = min(alpha, key=lambda r: r["final_loss"])
        text = (
            f"- **Soft-loss weight.** Lowest final loss: `{best['run']}` "
            f"({compare(best, baseline, 'final_loss')[1]} against the baseline)."
        )
        ending = [r for r in alpha if r["alpha"] in ("gap", "phase", "wsd", "ki")]
        constant = [r for r in alpha if r["alpha"] in ("normal", "strong")]
        if ending and constant:
            e = min(ending, key=lambda r: r["final_loss"])
            c = min(constant, key=lambda r: r["final_loss"])
            side, phrase = compare(e, c, "final_loss")
            text += (
                f" The best schedule that ends the teacher's role (`{e['run']}`, "
                f"{e['final_loss']:.4f}) against the best constant weight (`{c['run']}`, "
                f"{c['final_loss']:.4f}) is {phrase}. SALT, KI and the Pre-training "
                "Distillation study (a warmup–stable–decay weight best) say ending wins: "
                f"{verdict(side == 'below', [side])}."
            )
        lines.append(text)
    remap = by_factor["remap"]
    grown = [r for r in remap if r["init"] != "scratch"]
    scratch = [r for r in remap if r["init"] == "scratch"]
    if grown and scratch:
        g, sc = grown[0], scratch[0]
        side, phrase = compare(g, sc, "final_loss")
        lines.append(
            f"- **Remapping.** Grown from the teacher then taught by it (`{g['run']}`) ends "
            f"{phrase} against the same student from scratch (`{sc['run']}`). The DWT paper "
            f"found remapping hurts DWT: {verdict(side == 'above', [side])}. (Whole budgets "
            "here: the grown student also inherits the teacher's training; the growth factor "
            "charges it.)"
        )
    growth = by_factor["growth"]
    alone = [r for r in growth if r["run"].startswith("grown_") and r["alpha"] is None]
    if alone:
        parts = []
        for g in alone:
            side, phrase = compare(g, baseline, "final_loss")
            with_dwt = next((r for r in growth if r["run"] == g["run"].replace(
                "grown_" + g["run"].split("_")[1], "grown_" + g["run"].split("_")[1] + "_dwt"
            )), None)  # fmt: skip
            text = f"`{g['run']}` ends {phrase} against the student alone"
            if with_dwt is not None:
                text += f"; with DWT on top it ends {compare(with_dwt, g, 'final_loss')[1]}"
                text += " against grown alone"
            parts.append(text)
        sides = [compare(g, baseline, "final_loss")[0] for g in alone]
        lines.append(
            "- **Growth, compute-matched** (the teacher's training taken out of the grown "
            "students' steps): " + "; ".join(parts) + ". HyperCloning (2.2–4×), G_stack "
            "(~1.5×) and MSG report that growth speeds training up: "
            f"{verdict(all(x == 'below' for x in sides), sides)}. The DWT paper found "
            "remapping hurts DWT; the with-DWT figures above test that at equal compute."
        )
    tasked = list(
        {  # Each student once (a run shared by several factors has several rows).
            r["run"]: r for r in rows if r.get("task_accuracy") is not None and r["teacher"]
        }.values()
    )
    if tasked and baseline.get("task_accuracy") is not None:
        best = max(tasked, key=lambda r: r["task_accuracy"])
        above = [r for r in tasked if r["task_accuracy"] > baseline["task_accuracy"]]
        sides = [compare(r, baseline, "task_accuracy")[0] for r in tasked]
        counted, half = "", len(tasked) / 2
        holds, decided = len(above) > half, True
        if baseline["seeds"] > 1:  # Paired over the seeds: higher accuracy is 'above'.
            holds = sides.count("above") > half
            decided = holds or sides.count("below") > half
            counted = (
                f" (paired over the seeds: {sides.count('above')} above, "
                f"{sides.count('level')} level, {sides.count('below')} below)"
            )
        lines.append(
            f"- **Downstream** (each encoder fine-tuned alone on the classification task, "
            f"the DWT paper's measure): the student alone reaches "
            f"{baseline['task_accuracy']:.4f}; {len(above)} of {len(tasked)} students with a "
            f"teacher (taught by it or grown from it) do better on average{counted}, the "
            f"best `{best['run']}` at {best['task_accuracy']:.4f} "
            f"({compare(best, baseline, 'task_accuracy')[1]}). The DWT "
            "paper reports weak-teacher students ahead on GLUE: "
            f"{verdict(holds, [] if decided else ['level'])} here (one fine-tuning per "
            "encoder and seed; the task's validation set has 833 sentences, ±1.6 points)."
        )
    several = by_factor.get("multi_teacher", [])
    if several:
        best = min(several, key=lambda r: r["final_loss"])
        single = [r for r in quality if r["teacher"] in best["teachers"]]
        parts = [f"`{r['run']}` {compare(best, r, 'final_loss')[1]}" for r in single]
        sides = [compare(best, r, "final_loss")[0] for r in single]
        phrase = compare(best, baseline, "final_loss")[1]
        against = f" and against each teacher alone: {'; '.join(parts)}" if parts else ""
        lines.append(
            f"- **Several teachers.** The best rule, `{best['run']}`, ends {phrase} against "
            f"the student alone{against}. MT-BERT and CA-MKD report that several teachers "
            "beat the best single one in fine-tuning; with weak teachers in pre-training this "
            f"{verdict(all(x == 'below' for x in sides), sides)}. The weights "
            f"against the student's uncertainty are in `{WEIGHTS_PNG}`."
        )
    students = [r for r in rows if r["teacher"]]
    reached = [r for r in students if r["steps_to_baseline"] is not None]
    if reached:

        def cost(r: dict[str, Any]) -> float:  # Steps to the baseline's loss, teacher included.
            return (r["steps_to_baseline"] + r["charged_steps"]) / baseline["final_step"]

        fastest = min(reached, key=cost)
        charged = (
            f" + {fastest['charged_steps']} for the teacher" if fastest["charged_steps"] else ""
        )
        lines.append(
            f"- **Compute saved.** The cheapest way to the baseline's final loss: "
            f"`{fastest['run']}` at step {fastest['steps_to_baseline']:.0f}{charged}, "
            f"{cost(fastest):.2f}× the baseline's {baseline['final_step']} steps (SALT reports "
            f"~0.7× for 1.5B → 2.8B); {len(reached)} of {len(students)} student rows got there "
            "in at least one seed."
        )
    elif students:
        lines.append("- **Compute saved.** No DWT student reached the baseline's final loss.")
    return lines


def build_report(plan: StudyPlan, early_fraction: float) -> dict[str, Any]:
    """Every run's numbers and curves, each (factor, group) row over its seeds, the
    per-factor lines, 'what this shows' and the markdown."""
    runs = {name: _summary(plan, name, early_fraction) for name in plan.runs}
    groups = {
        group: aggregate([runs[n] for n in plan.replicas(group)])
        for group in dict.fromkeys(g for _, g in plan.rows)
    }
    baseline = groups[BASELINE]
    rows = []
    for factor, name in plan.rows:
        row = {"factor": factor, **groups[name]}
        row["delta_vs_baseline"] = row["final_loss"] - baseline["final_loss"]
        paired = paired_interval(row, baseline, "final_loss") if name != BASELINE else None
        row["delta_vs_baseline_95"] = paired[1] if paired else None
        teacher = groups[row["teacher"]] if row["teacher"] else None
        row["teacher_final_loss"] = teacher["final_loss"] if teacher else None
        labels = [_teacher_label(groups[t], baseline["final_step"]) for t in row["teachers"]]
        row["teacher_label"] = " + ".join(labels) if labels else "—"
        if len(labels) > 1:
            row["alpha_label"] += f", {plan.runs[name].config.distill.teacher_weighting} per token"
        rows.append(row)
    what = plan.metric.removeprefix("eval/").replace("_", " ").replace("mlm", "MLM")
    lines = [
        _best_line(title, [r for r in rows if r["factor"] == key], baseline, what)
        for key, title, _ in FACTORS
        if any(r["factor"] == key for r in rows)
    ]
    header = (
        "| factor | run | teacher (layers×hidden: own loss) | α_s / form | init | early step "
        "| early loss | early acc | final loss | final acc | Δ final loss vs baseline "
        "(± paired 95%) "
        "| seeds | final loss spread | steps to baseline |"
    )
    downstream = bool(plan.downstream)
    if downstream:  # The DWT paper's measure: accuracy after fine-tuning on the task.
        header += " task accuracy |"
    table = [header, "|" + "---|" * (15 if downstream else 14)]
    for r in rows:
        if r["steps_to_baseline"] is None:
            reach = "—" if not r["teacher"] else f"not reached (0 of {r['seeds']})"
        else:
            reach = f"{r['steps_to_baseline']:.0f}"
            if r["charged_steps"]:  # Growth: the teacher's training counted too.
                reach += f" + {r['charged_steps']}"
            if r["reached_baseline"] < r["seeds"]:
                reach += f" ({r['reached_baseline']} of {r['seeds']})"
        table.append(
            f"| {FACTOR_TITLES[r['factor']]} | {r['run']} | {r['teacher_label']} "
            f"| {r['alpha_label']} | {r['init']} "
            f"| {r['early_step']} | {r['early_loss']:.4f} | {r['early_accuracy']:.4f} "
            f"| {r['final_loss']:.4f} | {r['final_accuracy']:.4f} "
            f"| {_delta_cell(r)} | {r['seeds']} | {r['final_loss_spread']:.4f} "
            f"| {reach} |" + (f" {_task_cell(r)} |" if downstream else "")
        )
    student = plan.runs[BASELINE].config.model
    intro = (
        f"{student.get('family', 'bert')} student {student.num_layers}×{student.hidden_size}, "
        f"{baseline['final_step']} steps, seeds {', '.join(map(str, plan.seeds))} (every "
        "number is the mean over the seeds; the spread is max − min; '±' is the half-width "
        "of the 95% Student-t interval of the per-seed difference from the same seed's "
        "baseline, which shares its data order and initialisation). The baseline is the "
        f"student trained alone with the same budget. Held-out {what}: lower is better. "
        "Steps to baseline: the step at which a student first reaches its seed's baseline's "
        "final loss (interpolated between evaluations; '+ n': a grown student's teacher "
        "training, in student steps, counted on top). A run shared by several factors has "
        "a row in each."
    )
    findings = _findings(rows, baseline)
    markdown = "\n".join(
        [
            f"# DWT study: held-out {what} and accuracy", "", intro, "", *table, "", *lines,
            "", "## What this shows", "", *findings, "",
        ]
    )  # fmt: skip
    return {
        "runs": runs, "groups": groups, "rows": rows, "best": lines, "findings": findings,
        "markdown": markdown,
    }  # fmt: skip


def _band(curves: list[dict[str, list]], key: str) -> dict[str, list]:
    """The mean, min and max of ``key`` over the seeds' curves, at the steps they share."""
    steps = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    values = [[c[key][c["step"].index(s)] for c in curves] for s in steps]
    return {
        "step": steps,
        key: [sum(v) / len(v) for v in values],
        "low": [min(v) for v in values],
        "high": [max(v) for v in values],
    }


def _plot(path: str, panels: list[tuple[str, str, list[tuple[str, dict, str, str]]]]) -> None:
    """Side-by-side panels (title, y label, [(label, {'step', key[, 'low', 'high']}, key,
    style)]) against the step; a series with 'low' and 'high' gets a band (the seeds')."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (title, ylabel, lines) in zip(axes[0], panels, strict=True):
        for label, series, key, style in lines:
            (line,) = ax.plot(series["step"], series[key], style, ms=3, label=label)
            if "low" in series and series["low"] != series["high"]:
                ax.fill_between(
                    series["step"], series["low"], series["high"], color=line.get_color(),
                    alpha=0.15, linewidth=0,
                )  # fmt: skip
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], workdir: str) -> None:
    """Writes study.md, study.json and the PNG plots (seed bands) into ``workdir``."""
    import matplotlib

    matplotlib.use("Agg")
    with open(os.path.join(workdir, REPORT_MD), "w") as f:
        f.write(report["markdown"])
    with open(os.path.join(workdir, REPORT_JSON), "w") as f:
        json.dump({k: v for k, v in report.items() if k != "markdown"}, f, indent=1)
    runs = report["runs"]

    def band(group: str) -> dict[str, list]:
        return _band([r["curve"] for r in runs.values() if r["group"] == group], "loss")

    baseline = ("baseline (alone)", band(BASELINE), "loss", "k--")
    for key, title, filename in FACTORS:
        names = [r["run"] for r in report["rows"] if r["factor"] == key]
        if not names:
            continue
        lines = [(n, band(n), "loss", "o-") for n in names] + [baseline]
        _plot(os.path.join(workdir, filename), [(f"DWT study: {title}", "held-out loss", lines)])
    several = [r["run"] for r in report["rows"] if r["factor"] == "multi_teacher"]
    if several:
        _plot_weights(os.path.join(workdir, WEIGHTS_PNG), runs, several)
    names = [r["run"] for r in report["rows"] if r["factor"] == "alpha"]
    if names:
        _plot(
            os.path.join(workdir, SCHEDULES_PNG),
            [
                (title, title, [(n, runs[n]["schedule"], key, "-") for n in names])
                for title, key in (("α_s (α_t in the KI form)", "alpha"), ("τ", "tau"))
            ],
        )


def _plot_weights(path: str, runs: dict[str, Any], groups: list[str]) -> None:
    """One panel per rule: each teacher's mean weight against the student's uncertainty
    (quarters of [0, 1]), the mean over seeds, with the share of tokens in each."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        members = [r for r in runs.values() if r["group"] == group and r["weights_by_uncertainty"]]
        if not members:
            continue
        first = members[0]
        x = first["weights_by_uncertainty"]["bin_center"]
        for k, teacher in enumerate(first["teachers"]):
            values = [m["weights_by_uncertainty"][f"teacher{k}"] for m in members]
            known = [[v[b] for v in values if v[b] is not None] for b in range(len(x))]
            mean = [sum(k) / len(k) if k else float("nan") for k in known]  # nan: no token
            ax.plot(x, mean, "o-", label=teacher.removeprefix("teacher_"))
        share = [sum(m["weights_by_uncertainty"]["share"][b] for m in members) / len(members)
                 for b in range(len(x))]  # fmt: skip
        ax.bar(x, share, width=0.2, alpha=0.15, color="k", label="share of tokens")
        ax.set(title=group, xlabel="student's normalised uncertainty", ylabel="teacher weight",
               ylim=(0, 1))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
