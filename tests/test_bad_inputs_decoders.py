"""Bad inputs for decoders through the real command line (as tests/test_bad_inputs.py
does for the rest): one line naming the field, exit status 2, no traceback, nothing
written. An unknown family, grouped-query heads that do not divide, a teacher of
another vocabulary, an encoder where a decoder is needed (and the reverse), a Hugging
Face directory of an unsupported architecture, a tokenizer without an end of
document, settings of the causal objective."""

from __future__ import annotations

import json
import os
import sys

import cli_forks
import pytest
from testutil import REPO_ROOT, load_config

CAUSAL = "configs/causal.py:smoke"
BASE = "configs/base.py:smoke"
WORKERS = 2
CASE_TIMEOUT_S = 120.0

# (name, field the error line must name, config, args); {tmp}: prepared files.
CASES = (
    ("unknown_family", "model.family", CAUSAL, ("--config.model.family=mamba",)),
    ("kv_heads_not_dividing", "model.num_kv_heads", CAUSAL, ("--config.model.num_kv_heads=3",)),
    (
        "gpt2_with_grouped_query_heads",
        "teacher.model.num_kv_heads",
        CAUSAL,
        ("--config.teacher.model.family=gpt2",),
    ),
    (
        "teacher_of_another_vocabulary",
        "teacher.workdirs[0]",
        CAUSAL,
        ("--config.teacher.workdirs=('{tmp}/llama_v1024',)",),
    ),
    (
        "encoder_teacher_for_a_decoder",
        "teacher.workdirs[0]",
        CAUSAL,
        ("--config.teacher.workdirs=('{tmp}/bert_run',)",),
    ),
    (
        "decoder_teacher_for_an_encoder",
        "teacher.workdirs[0]",
        BASE,
        ("--config.teacher.workdirs=('{tmp}/llama_v512',)",),
    ),
    (
        "encoder_as_initial_weights_of_a_decoder",
        "init.workdir",
        CAUSAL,
        ("--config.init.workdir={tmp}/bert_run", "--config.distill.strategy=clm"),
    ),
    (
        "hf_directory_of_unsupported_architecture",
        "teacher.workdirs[0]",
        CAUSAL,
        ("--config.teacher.workdirs=('hf:{tmp}/hf_gptj',)",),
    ),
    (
        "hf_encoder_directory_as_decoder_teacher",
        "teacher.workdirs[0]",
        CAUSAL,
        ("--config.teacher.workdirs=('hf:{tmp}/hf_bert',)",),
    ),
    (
        "masked_lm_strategy_for_a_decoder",
        "distill.strategy",
        CAUSAL,
        ("--config.distill.strategy=mlm",),
    ),
    ("unknown_divergence", "distill.divergence", CAUSAL, ("--config.distill.divergence=emd",)),
    (
        "jsd_beta_at_the_edge",
        "distill.jsd_beta",
        CAUSAL,
        ("--config.distill.divergence=jsd", "--config.distill.jsd_beta=1.0"),
    ),
    (
        "sliding_window_shorter_than_sequences",
        "model.sliding_window",
        CAUSAL,
        ("--config.model.sliding_window=16",),
    ),
    (
        "tokenizer_without_end_of_document",
        "data.tokenizer_path",
        CAUSAL,
        ("--config.data.tokenizer_path={tmp}/wordpiece.json",),
    ),
)


def _run_dir(tmp: str, name: str, config: dict) -> None:
    """A run's workdir as the up-front checks read it: config.json, a checkpoint step."""
    os.makedirs(os.path.join(tmp, name, "checkpoints", "6"))
    with open(os.path.join(tmp, name, "config.json"), "w") as f:
        json.dump(config, f)


def _prepare(tmp: str) -> None:
    causal = load_config("smoke", name="causal").to_dict()
    _run_dir(tmp, "llama_v1024", {**causal, "model": {**causal["model"], "vocab_size": 1024}})
    _run_dir(tmp, "llama_v512", {**causal})
    bert = load_config("smoke").to_dict()
    _run_dir(tmp, "bert_run", {**bert, "model": {**bert["model"], "vocab_size": 512}})
    for name, hf_config in {
        "hf_gptj": {"model_type": "gptj", "architectures": ["GPTJForCausalLM"], "n_embd": 32},
        "hf_bert": {
            "model_type": "bert",
            "architectures": ["BertForMaskedLM"],
            "vocab_size": 512,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        },
    }.items():
        os.makedirs(os.path.join(tmp, name))
        with open(os.path.join(tmp, name, "config.json"), "w") as f:
            json.dump(hf_config, f)
        with open(os.path.join(tmp, name, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 16)
    from dwt_jax.data.tokenizer import new_wordpiece_tokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"])}
    new_wordpiece_tokenizer(vocab).save(os.path.join(tmp, "wordpiece.json"))


@pytest.fixture(scope="module")
def battery(tmp_path_factory, data_cache_dir):
    tmp = str(tmp_path_factory.mktemp("bad_decoder_inputs"))
    _prepare(tmp)
    spec = {}
    for name, _, config, args in CASES:
        argv = [
            f"--config={config}",
            f"--workdir={tmp}/runs/{name}",
            f"--config.data.tfds_data_dir={data_cache_dir}/tfds",
            f"--config.data.tokenizer_cache_dir={data_cache_dir}/tokenizers",
            *(arg.format(tmp=tmp) for arg in args),
        ]
        spec[name] = {"argv": argv, "env": {}}
    return cli_forks.run_cases(spec, tmp, __file__), tmp


@pytest.mark.parametrize(("name", "field", "config", "args"), CASES, ids=[c[0] for c in CASES])
def test_bad_decoder_input_is_one_line_exit_2_and_writes_nothing(
    battery, name, field, config, args
):
    results, tmp = battery
    result = results[name]
    cli_forks.assert_one_error_line(result, field, f"case {name!r} ({' '.join(result['argv'])})")
    assert not os.path.exists(os.path.join(tmp, "runs", name)), f"{name}: the workdir exists"
    assert not os.path.exists(os.path.join(REPO_ROOT, "runs", name))


if __name__ == "__main__":
    cli_forks.drive(
        sys.argv[1], sys.argv[2], ("dwt_jax.experiment", cli_forks.MAIN), WORKERS, CASE_TIMEOUT_S
    )
