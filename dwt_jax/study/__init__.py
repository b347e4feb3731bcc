"""The DWT study: teacher quality, soft-loss weight, remapping, growth; both families.

Every factor is measured against the same student trained alone with the same budget,
on held-out MLM loss and accuracy. Each distinct run is trained once, in its own
subdirectory of the study's workdir, and resumes if the study is rerun; a run already
finished with the same settings is not touched. See ``configs/study/dwt_study.py``.

    python -m dwt_jax.study --workdir=runs/study [--family=bert|llama|both] [--seeds=3]
        [--factors=teacher_quality,alpha,remap] [--quick] [--config=configs/study/...py]

Without ``--config`` it runs each selected family's study (``FAMILY_CONFIGS``) into
``<workdir>/<family>``. Every run is repeated for each of ``study.seeds`` (the table
gives the mean and the spread, the plots a band). Writes ``study.md`` (the table, the
per-factor lines and "what this shows"), ``study.json`` (the same, plus the curves) and
``teacher_quality.png``, ``alpha.png``, ``remap.png``, ``schedules.png``.
"""

from dwt_jax.study.compare import compare, paired_interval, verdict
from dwt_jax.study.plan import (
    BASELINE,
    FACTOR_TITLES,
    FACTORS,
    FAMILY_CONFIGS,
    REPORT_JSON,
    REPORT_MD,
    SCHEDULES_PNG,
    STUDY_CONFIG,
    StudyPlan,
    StudyResult,
    StudyRun,
    plan_study,
)
from dwt_jax.study.report import aggregate, build_report, write_report
from dwt_jax.study.run import (
    finished_part,
    load_study_config,
    main,
    report_study,
    run_cli,
    run_study,
)

__all__ = [
    "BASELINE",
    "FACTORS",
    "FACTOR_TITLES",
    "FAMILY_CONFIGS",
    "REPORT_JSON",
    "REPORT_MD",
    "SCHEDULES_PNG",
    "STUDY_CONFIG",
    "StudyPlan",
    "StudyResult",
    "StudyRun",
    "aggregate",
    "build_report",
    "compare",
    "finished_part",
    "load_study_config",
    "main",
    "paired_interval",
    "plan_study",
    "report_study",
    "run_cli",
    "run_study",
    "verdict",
    "write_report",
]  # fmt: skip
