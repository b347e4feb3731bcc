"""Bad inputs through the real command line: one line naming the field, exit status 2,
no traceback, no workdir.

Every case runs the CLI's entry point (``dwt_jax.main.run_cli``: absl's flag parsing
through ``parse_flags``, then ``main`` and ``experiment.run``) in a child process
forked from one driver process (this file run as a script), which imported dwt_jax
once and never started JAX's backend: a fresh interpreter per case would cost ~3 s of
imports each on the 2-core machine. Children see one CPU device (XLA_FLAGS is not
inherited from the test session), or the ``devices`` a case asks for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import cli_forks
import pytest
from testutil import REPO_ROOT

SMOKE = "configs/pretrain.py:smoke"
BASE = "configs/base.py:smoke"
FINETUNE = "configs/finetune/base.py:smoke"
WORKERS = 2  # Children at a time (the machine has 2 cores).
CASE_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class Case:
    """A bad command line: ``args`` after ``--config`` and ``--workdir`` ({tmp}: the
    battery's directory of prepared files); the error line must contain ``field``."""

    name: str
    field: str
    args: tuple[str, ...] = ()
    config: str | None = SMOKE  # None: no --config at all; else the --config value.
    workdir: str | None = "{tmp}/runs/{name}"  # None: no --workdir.
    devices: int = 1


CASES = (
    # Wrong types on the command line and in config files.
    Case("cli_int_field_not_an_int", "data.batch_size", ("--config.data.batch_size=abc",)),
    Case("cli_int_field_given_a_float", "data.seq_len", ("--config.data.seq_len=1.5",)),
    Case(
        "cli_float_field_not_a_number", "optim.learning_rate", ("--config.optim.learning_rate=x",)
    ),
    Case("cli_bool_field_not_a_bool", "log.tensorboard", ("--config.log.tensorboard=maybe",)),
    Case("cli_unknown_field", "data.batch_sise", ("--config.data.batch_sise=8",)),
    Case("cli_unknown_section", "dta.batch_size", ("--config.dta.batch_size=8",)),
    Case("cli_int_flag_not_an_int", "--num_processes", ("--num_processes=two",)),
    Case("cli_enum_flag_unknown", "--distributed", ("--distributed=maybe",)),
    Case("file_string_for_an_int", "data.batch_size", config="{tmp}/string_batch.py"),
    Case("file_float_layer_count", "model.num_layers", config="{tmp}/float_layers.py"),
    Case("file_bool_for_a_size", "model.hidden_size", config="{tmp}/bool_hidden.py"),
    Case("file_string_for_a_list", "teacher.workdirs", config="{tmp}/string_teachers.py"),
    Case("file_string_for_a_rate", "model.dropout_rate", config="{tmp}/string_dropout.py"),
    Case("file_nonfinite_streak_negative", "train.max_nonfinite_streak", config="{tmp}/streak.py"),
    Case("file_missing_field", "data.seq_len", config="{tmp}/no_seq_len.py"),
    # Sizes.
    Case("negative_layer_count", "model.num_layers", ("--config.model.num_layers=-1",)),
    Case("zero_batch_size", "data.batch_size", ("--config.data.batch_size=0",)),
    Case("zero_steps", "train.num_steps", ("--config.train.num_steps=0",)),
    Case("negative_warmup", "optim.warmup_steps", ("--config.optim.warmup_steps=-5",)),
    Case("hidden_not_divisible_by_heads", "model.num_heads", ("--config.model.num_heads=3",)),
    Case(
        "teacher_hidden_not_divisible_by_heads",
        "teacher.model.num_heads",
        ("--config.teacher.model.num_heads=3",),
        config=BASE,
    ),
    Case("seq_len_above_positions", "data.seq_len", ("--config.data.seq_len=128",)),
    Case(
        "more_predictions_than_tokens",
        "data.max_predictions",
        ("--config.data.max_predictions=65",),
    ),
    # Teachers: vocabulary, missing runs.
    Case(
        "teacher_model_vocabulary",
        "teacher.model.vocab_size",
        ("--config.teacher.model.vocab_size=2048",),
        config=BASE,
    ),
    Case(
        "given_teacher_vocabulary",
        "teacher.workdirs[0]",
        ("--config.teacher.workdirs=('{tmp}/teacher_v2048',)",),
        config=BASE,
    ),
    Case(
        "missing_teacher_directory",
        "teacher.workdirs[0]",
        ("--config.teacher.workdirs=('{tmp}/no_such_teacher',)",),
        config=BASE,
    ),
    Case("missing_init_directory", "init.workdir", ("--config.init.workdir={tmp}/no_such_run",)),
    # Unknown names.
    Case("unknown_strategy", "distill.strategy", ("--config.distill.strategy=magic",)),
    Case(
        "finetune_strategy_in_pretraining", "distill.strategy", ("--config.distill.strategy=rl_kd",)
    ),
    Case(
        "pretraining_strategy_in_finetuning",
        "distill.strategy",
        ("--config.distill.strategy=dwt",),
        config=FINETUNE,
    ),
    Case(
        "unknown_schedule",
        "distill.alpha_s.name",
        ("--config.distill.alpha_s.name=sometimes",),
        config=BASE,
    ),
    Case("unknown_dwt_form", "distill.form", ("--config.distill.form=strong",), config=BASE),
    Case("unknown_data_source", "data.source", ("--config.data.source=wikipedia",)),
    Case(
        "unknown_tfds_dataset",
        "data.tfds_name",
        ("--config.data.source=tfds", "--config.data.tfds_name=no_such_dataset"),
    ),
    Case("unknown_finetune_task", "data.task", ("--config.data.task=glue/nope",), config=FINETUNE),
    Case("unknown_lr_decay", "optim.decay", ("--config.optim.decay=exponential",)),
    Case("unknown_teacher_layout", "teacher.sharding", ("--config.teacher.sharding=zero3",)),
    Case(
        "unknown_dynamic_kd_selection",
        "distill.dynamic_kd.selection",
        ("--config.distill.strategy=dynamic_kd", "--config.distill.dynamic_kd.selection=hardest"),
        config=FINETUNE,
    ),
    Case(
        "unknown_rl_kd_reward",
        "distill.rl_kd.reward",
        ("--config.distill.strategy=rl_kd", "--config.distill.rl_kd.reward=accuracy"),
        config=FINETUNE,
    ),
    # The mesh.
    Case(
        "batch_not_divisible_by_mesh", "data.batch_size", ("--config.data.batch_size=6",), devices=4
    ),
    Case(
        "eval_batch_not_divisible_by_mesh",
        "data.eval_batch_size",
        ("--config.data.eval_batch_size=6",),
        devices=4,
    ),
    Case(
        "batch_not_divisible_by_accumulation",
        "optim.grad_accum_steps",
        ("--config.optim.grad_accum_steps=3",),
    ),
    Case("mesh_larger_than_devices", "mesh.data", ("--config.mesh.data=2",)),
    Case("two_fill_axes", "mesh.fsdp", ("--config.mesh.fsdp=-1",)),
    Case(
        "heads_not_divisible_by_tensor_axis",
        "model.num_heads",
        ("--config.mesh.data=1", "--config.mesh.tensor=4"),
        devices=4,
    ),
    # Schedules and strategy settings out of range.
    Case(
        "ki_alpha_above_one",
        "distill.alpha_s.value",
        ("--config.distill.form=ki", "--config.distill.alpha_s.value=1.5"),
        config=BASE,
    ),
    Case(
        "negative_alpha",
        "distill.alpha_s.value",
        ("--config.distill.alpha_s.value=-1.0",),
        config=BASE,
    ),
    Case("zero_temperature", "distill.tau.value", ("--config.distill.tau.value=0.0",), config=BASE),
    Case(
        "decaying_schedule_without_steps",
        "distill.alpha_s.steps",
        ("--config.distill.alpha_s.name=linear", "--config.distill.alpha_s.steps=0"),
        config=BASE,
    ),
    Case(
        "selection_ratio_above_one",
        "distill.dynamic_kd.ratio",
        ("--config.distill.strategy=dynamic_kd", "--config.distill.dynamic_kd.ratio=1.5"),
        config=FINETUNE,
    ),
    Case(
        "selection_ratio_zero",
        "distill.dynamic_kd.ratio",
        ("--config.distill.strategy=dynamic_kd", "--config.distill.dynamic_kd.ratio=0.0"),
        config=FINETUNE,
    ),
    Case(
        "rl_kd_alpha_above_one",
        "distill.rl_kd.alpha",
        ("--config.distill.strategy=rl_kd", "--config.distill.rl_kd.alpha=2.0"),
        config=FINETUNE,
    ),
    Case(
        "rl_kd_baseline_decay_one",
        "distill.rl_kd.baseline_decay",
        ("--config.distill.strategy=rl_kd", "--config.distill.rl_kd.baseline_decay=1.0"),
        config=FINETUNE,
    ),
    Case(
        "ca_mkd_zero_temperature",
        "distill.ca_mkd.tau",
        ("--config.distill.strategy=ca_mkd", "--config.distill.ca_mkd.tau=0.0"),
        config=FINETUNE,
    ),
    Case(
        "mt_bert_negative_temperature",
        "distill.mt_bert.tau",
        ("--config.distill.mt_bert.tau=-1.0",),
        config=FINETUNE,
    ),
    Case("adam_b2_one", "optim.b2", ("--config.optim.b2=1.0",)),
    Case("negative_learning_rate", "optim.learning_rate", ("--config.optim.learning_rate=-0.001",)),
    Case("zero_mask_probability", "data.mask_prob", ("--config.data.mask_prob=0.0",)),
    # The workdir and the command line itself.
    Case("unwritable_workdir", "--workdir", workdir="{tmp}/a_file/run"),
    Case("object_store_workdir", "--workdir", workdir="gs://dwt-bad-inputs-bucket/run"),
    Case("missing_workdir_flag", "--workdir", workdir=None),
    Case("missing_config_flag", "--config", config=None),
    Case("missing_config_file", "--config", config="configs/no_such_config.py"),
    Case("unknown_config_variant", "--config", config="configs/pretrain.py:huge"),
    Case("stray_argument", "unexpected arguments", ("stray",)),
    Case(
        "workdir_name_too_long", "longer than the filesystem allows", workdir="{tmp}/" + "w" * 300
    ),
    # Malformed files a user hands in: config files, a referenced run's files.
    Case("config_syntax_error", "syntax_error.py", config="{tmp}/syntax_error.py"),
    Case("config_get_config_raises", "raises.py", config="{tmp}/raises.py"),
    Case(
        "teacher_config_json_damaged",
        "teacher.workdirs[0]",
        ("--config.teacher.workdirs=('{tmp}/damaged_config_run',)",),
        config=BASE,
    ),
    Case(
        "teacher_config_json_not_a_mapping",
        "teacher.workdirs[0]",
        ("--config.teacher.workdirs=('{tmp}/list_config_run',)",),
        config=BASE,
    ),
    Case(
        "init_config_json_damaged",
        "init.workdir",
        ("--config.init.workdir={tmp}/damaged_config_run",),
    ),
    Case(
        "teacher_tokenizer_damaged",
        "teacher.workdirs[0]",
        ("--config.teacher.workdirs=('{tmp}/damaged_tokenizer_run',)",),
        config=BASE,
    ),
    Case(
        "hf_teacher_config_damaged",
        "damaged_hf",
        ("--config.teacher.workdirs=('hf:{tmp}/damaged_hf',)",),
        config=BASE,
    ),
    Case(
        "finetune_encoder_config_damaged",
        "init.workdir",
        ("--config.init.workdir={tmp}/damaged_config_run",),
        config=FINETUNE,
    ),
    # Runs of the wrong kind.
    Case(
        "finetune_run_as_pretraining_teacher",
        "teacher.workdirs[0]",
        ("--config.teacher.workdirs=('{tmp}/finetune_run',)",),
        config=BASE,
    ),
    Case(
        "finetune_run_as_initial_weights",
        "init.workdir",
        ("--config.init.workdir={tmp}/finetune_run",),
    ),
    Case(
        "ensemble_run_as_pretraining_teacher",
        "teacher.workdirs[0]",
        ("--config.teacher.workdirs=('{tmp}/ensemble_run',)",),
        config=BASE,
    ),
    Case(
        "pretraining_run_as_finetuning_teacher",
        "teacher.workdirs[0]",
        ("--config.teacher.workdirs=('{tmp}/pretrain_run',)",),
        config=FINETUNE,
    ),
    Case(
        "finetune_run_as_encoder",
        "init.workdir",
        ("--config.init.workdir={tmp}/finetune_run",),
        config=FINETUNE,
    ),
    Case(
        "finetune_run_as_ensemble_member_encoder",
        "teacher.init_workdirs[1]",
        ("--config.teacher.init_workdirs=('', '{tmp}/finetune_run')",),
        config=FINETUNE,
    ),
    # Settings that only the traced step used to find.
    Case(
        "fixed_weights_of_another_length",
        "distill.fixed_weights.weights",
        (
            "--config.distill.strategy=fixed_weights",
            "--config.distill.fixed_weights.weights=(0.2, 0.3, 0.5)",
        ),
        config=FINETUNE,
    ),
    # Paths that are files.
    Case(
        "tfds_data_dir_is_a_file",
        "data.tfds_data_dir",
        ("--config.data.tfds_data_dir={tmp}/a_file",),
    ),
    Case(
        "tokenizer_path_damaged",
        "damaged_tokenizer_run",
        ("--config.data.tokenizer_path={tmp}/damaged_tokenizer_run/tokenizer.json",),
    ),
)

# Config files with wrong types (a user's file that builds its config as a plain dict).
_CONFIG_FILE = """
import os
import ml_collections
from dwt_jax.configuration import load_config_file

def get_config(variant=None):
    config = load_config_file(os.path.join({repo!r}, "configs", "pretrain.py"), "smoke").to_dict()
    {edit}
    return ml_collections.ConfigDict(config)
"""
# Config files that fail to load: the error names the file, never a traceback.
BROKEN_FILES = {
    "syntax_error": "def get_config(variant=None)\n    return None\n",
    "raises": "def get_config(variant=None):\n    raise RuntimeError('no config today')\n",
}
BAD_FILES = {
    "string_batch": 'config["data"]["batch_size"] = "8"',
    "float_layers": 'config["model"]["num_layers"] = 2.0',
    "bool_hidden": 'config["model"]["hidden_size"] = True',
    "string_teachers": 'config["teacher"]["workdirs"] = "runs/teacher"',
    "string_dropout": 'config["model"]["dropout_rate"] = "0.1"',
    "streak": 'config["train"]["max_nonfinite_streak"] = -1',
    "no_seq_len": 'del config["data"]["seq_len"]',
}


def _prepare(tmp: str) -> None:
    """The files the cases point at: bad config files, a teacher run of another
    vocabulary (its config and checkpoint names: all the up-front check reads), a file
    where a workdir's parent should be."""
    for name, edit in BAD_FILES.items():
        with open(os.path.join(tmp, f"{name}.py"), "w") as f:
            f.write(_CONFIG_FILE.format(repo=REPO_ROOT, edit=edit))
    teacher = os.path.join(tmp, "teacher_v2048")
    os.makedirs(os.path.join(teacher, "checkpoints", "6"))
    from testutil import load_config

    model = load_config("smoke").model.to_dict()
    with open(os.path.join(teacher, "config.json"), "w") as f:
        json.dump({"model": {**model, "vocab_size": 2048}}, f)
    with open(os.path.join(tmp, "a_file"), "w") as f:
        f.write("not a directory\n")
    for name, text in BROKEN_FILES.items():
        with open(os.path.join(tmp, f"{name}.py"), "w") as f:
            f.write(text)
    _prepare_runs(tmp, model)


def _plain(value: Any) -> Any:
    """Nested ConfigDicts in a ``to_dict()`` (a config's list of sections) as dicts."""
    return value.to_dict()


def _run(tmp: str, name: str, config: Any, files: dict[str, str] | None = None) -> None:
    """A run's workdir as the up-front checks read it: config.json (``config``: a
    dict, or text written as it is), a checkpoint step's directory, other files."""
    run = os.path.join(tmp, name)
    os.makedirs(os.path.join(run, "checkpoints", "6"))
    with open(os.path.join(run, "config.json"), "w") as f:
        f.write(config if isinstance(config, str) else json.dumps(config, default=_plain))
    for file, text in (files or {}).items():
        with open(os.path.join(run, file), "w") as f:
            f.write(text)


def _prepare_runs(tmp: str, model: dict[str, Any]) -> None:
    """Runs of the wrong kind and runs with damaged files."""
    from testutil import load_config

    _run(tmp, "damaged_config_run", '{"model": {"hidden_size": 32,')
    _run(tmp, "list_config_run", "[1, 2, 3]")
    _run(tmp, "damaged_tokenizer_run", {"model": model}, {"tokenizer.json": '{"version": "1.0", '})
    _run(tmp, "pretrain_run", load_config("smoke").to_dict())
    finetune = load_config("smoke", name="finetune/base").to_dict()
    _run(tmp, "finetune_run", {**finetune, "mode": "finetune"})
    members = {**finetune, "mode": "finetune", "distill": {"strategy": "cofinetune"}}
    _run(tmp, "ensemble_run", members)
    hf_dir = os.path.join(tmp, "damaged_hf")
    os.makedirs(hf_dir)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        f.write('{"model_type": "bert", "hidden_size": ')
    with open(os.path.join(hf_dir, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 16)


def _argv(case: Case, tmp: str, data_cache_dir: str) -> list[str]:
    fill = lambda s: s.format(tmp=tmp, name=case.name)
    argv = [f"--config={fill(case.config)}"] if case.config is not None else []
    argv += [f"--workdir={fill(case.workdir)}"] if case.workdir is not None else []
    if case.config is not None:
        argv += [
            f"--config.data.tfds_data_dir={data_cache_dir}/tfds",
            f"--config.data.tokenizer_cache_dir={data_cache_dir}/tokenizers",
        ]
    return argv + [fill(arg) for arg in case.args]  # Last: a case may override the above.


@pytest.fixture(scope="module")
def battery(tmp_path_factory, data_cache_dir) -> tuple[dict[str, Any], str]:
    """Runs every case through the driver (~6 s); (results by case, the tmp dir)."""
    tmp = str(tmp_path_factory.mktemp("bad_inputs"))
    _prepare(tmp)
    spec = {
        case.name: {
            "argv": _argv(case, tmp, data_cache_dir),
            "env": {"XLA_FLAGS": f"--xla_force_host_platform_device_count={case.devices}"}
            if case.devices > 1
            else {},
        }
        for case in CASES
    }
    spec["help"] = {"argv": ["--helpfull"], "env": {}}
    return cli_forks.run_cases(spec, tmp, __file__), tmp


def test_battery_is_large_and_distinct():
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names) >= 25
    assert len({(case.config, case.args, case.workdir, case.devices) for case in CASES}) == len(
        CASES
    )


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, battery):
    results, tmp = battery
    result = results[case.name]
    where = f"case {case.name!r} ({' '.join(result['argv'])})"
    cli_forks.assert_one_error_line(result, case.field, where)
    if case.workdir is not None:
        workdir = case.workdir.format(tmp=tmp, name=case.name)
        assert not os.path.exists(os.path.join(REPO_ROOT, workdir)), f"{where}: workdir exists"


def test_help_still_works(battery):
    result = battery[0]["help"]
    assert result["rc"] != 2 and "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert "--workdir" in result["stdout"] and "--config" in result["stdout"]


# --- The driver (this file run as a script) ---------------------------------------


if __name__ == "__main__":
    cli_forks.drive(
        sys.argv[1], sys.argv[2], ("dwt_jax.experiment", cli_forks.MAIN), WORKERS, CASE_TIMEOUT_S
    )
