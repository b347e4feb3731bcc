"""Command line: ``python -m dwt_jax.export --workdir=DIR --out=HF_DIR [--step=N]``.

Writes the student of a dwt_jax run as a Hugging Face model directory
(``config.json``, ``model.safetensors``, tokenizer files): a pre-training run as
``BertForMaskedLM`` (``RobertaForMaskedLM`` for a RoBERTa-shaped model), a
fine-tuning run as ``BertForSequenceClassification``, a decoder run (model.family
gpt2 or llama) as the transformers causal LM its config describes
(``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM`` or ``MistralForCausalLM``; ``hf.export_decoder_dir``), its
tokenizer with the end-of-text and padding tokens set. Only the student is exported;
its adapters (hidden-state projections) and the optimiser state are not. The
tokenizer files are copied from the Hugging Face directory the run's tokenizer came
from, or generated from the run's ``tokenizer.json`` (with BERT's ``[CLS] … [SEP]``
template). A bad workdir ends with one line and exit status 2; nothing is written
under ``--out`` unless the whole directory is complete.
"""

from __future__ import annotations

import os
from typing import Any

from absl import flags

from dwt_jax import cli
from dwt_jax.errors import ConfigError

_EXAMPLES = {"workdir": "runs/my_run/student", "out": "hf/student"}


def _define_flags() -> None:
    """The CLI's flags (defined only when run, so importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "The dwt_jax run to export.")
    flags.DEFINE_string("out", None, "The Hugging Face model directory to write.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.mark_flags_as_required(["workdir", "out"])


def _tokenizer_dir(saved: dict[str, Any]) -> str | None:
    """The Hugging Face directory the run's tokenizer came from, if it still exists."""
    path = os.path.expanduser(str(saved.get("data", {}).get("tokenizer_path", "") or ""))
    path = path.removeprefix("hf:")
    return path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else None


def export(workdir: str, out: str, step: int | None = None) -> list[str]:
    """Exports the student of the run in ``workdir`` to ``out``; returns the files."""
    import jax
    import ml_collections
    import numpy as np

    from dwt_jax import hf, readers, sharding
    from dwt_jax import teachers as teachers_lib
    from dwt_jax.data import classification
    from dwt_jax.finetune import run as finetune_run
    from dwt_jax.models.bert import BertClassifier

    field = "--workdir"
    saved = teachers_lib.read_run_config(workdir, field)
    latest = teachers_lib.latest_teacher_step(workdir, field)
    step = latest if step is None else step
    if not os.path.isdir(os.path.join(workdir, teachers_lib.TEACHER_CHECKPOINT_DIR, str(step))):
        raise ConfigError(f"--step={step}: {workdir} has no checkpoint {step} (latest: {latest}).")
    if os.path.exists(out) and os.listdir(out):
        raise ConfigError(f"--out={out} exists and is not empty; pick a new directory.")
    mesh = sharding.make_mesh(
        ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1]
    )
    problem_type = None
    kind = teachers_lib.run_kind(saved)
    if kind != teachers_lib.PRETRAINING:
        if kind == teachers_lib.ENSEMBLE:
            raise ConfigError(
                f"{field}: {workdir} is a co-finetuned teacher ensemble (shared head); "
                "export a student run, or fine-tune one model alone and export that."
            )
        task = classification.task_from_config(ml_collections.ConfigDict(saved["data"]))
        cfg = finetune_run.model_config(saved["model"], task.num_labels, "model")
        abstract, _ = teachers_lib.abstract_params(BertClassifier(cfg), mesh)
        params = finetune_run.restore_params(workdir, step, abstract)
        head = "classifier"
        problem_type = "regression" if task.is_regression else "single_label_classification"
    else:
        cfg = teachers_lib.saved_model_config(saved, workdir, field)  # Read once, above.
        plan = teachers_lib.TeacherPlan(workdir, cfg, step)
        params = teachers_lib.load_teacher(plan, mesh, field).params
        head = "mlm"
    tokenizer_file = os.path.join(workdir, teachers_lib.TEACHER_TOKENIZER_FILE)
    tokenizer = (
        readers.load_tokenizer_file(tokenizer_file, field)
        if os.path.isfile(tokenizer_file)
        else None
    )
    params = jax.tree.map(np.asarray, jax.device_get(params))
    try:
        if cfg.objective == "clm":
            return hf.export_decoder_dir(
                params, cfg, tokenizer, out, tokenizer_dir=_tokenizer_dir(saved)
            )
        return hf.write_dir(
            out,
            params,
            cfg,
            head,
            tokenizer,
            _tokenizer_dir(saved),
            problem_type=problem_type,
        )
    except hf.HFConversionError as e:
        raise ConfigError(str(e)) from None


def main(argv: list[str]) -> None:
    """CLI: flags → `export`; ``cli.run`` turns a ``ConfigError`` into one line and
    exit 2."""
    del argv  # The flag parser refused positional arguments.
    f = flags.FLAGS
    cli.check_workdir(f.out, flag="--out")  # Before the checkpoint is read.
    files = export(f.workdir, f.out, f.step)
    print(f"dwt_jax.export: wrote {f.out}: {', '.join(files)}", flush=True)


def run_cli() -> None:
    """The entry point of ``python -m dwt_jax.export``."""
    _define_flags()
    cli.run(main, _EXAMPLES)


if __name__ == "__main__":
    run_cli()
