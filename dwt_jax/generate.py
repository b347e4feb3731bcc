"""Command line: ``python -m dwt_jax.generate --workdir=RUN --prompt="..."``.

Samples text from a decoder: the newest (or ``--step``) checkpoint of a causal-LM
run of this stack with the run's ``tokenizer.json``, or a Hugging Face
``*ForCausalLM`` directory (``--workdir=hf:DIR``) with its tokenizer. The prompt is
encoded without the tokenizer's template, after the beginning-of-document token when
the tokenizer has one (as the causal packer lays documents out), and continued by
`dwt_jax.models.sampling.generate_tokens` through the KV cache: greedy with
``--temperature=0`` (the default), else sampled with ``--top_k`` / ``--top_p``. A
row that emits the end-of-document token stops there. Each of ``--num_samples``
texts (prompt and continuation) is printed; ``--num_samples=2`` and more print a
``[sample i]`` line before each. A bad command line (a missing or encoder run, an
empty or too long prompt, a bad value) ends with one ``dwt_jax: error:`` line and
exit status 2 before the weights are read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from absl import flags

from dwt_jax import cli
from dwt_jax.errors import ConfigError

if TYPE_CHECKING:  # Imported when run: a bad flag is reported before jax is imported.
    import tokenizers

    from dwt_jax.models.decoder_config import DecoderConfig
    from dwt_jax.teachers import TeacherPlan

_EXAMPLES = {"workdir": "runs/my_causal_run", "prompt": "'Once upon a time'"}
FIELD = "--workdir"


def _define_flags() -> None:
    """The CLI's flags (defined only when run, so importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "A causal-LM run's workdir, or hf:DIR.")
    flags.DEFINE_string("prompt", None, "The text to continue.")
    flags.DEFINE_integer("max_new_tokens", 50, "Tokens to generate after the prompt.")
    flags.DEFINE_float("temperature", 0.0, "0: greedy decoding; > 0: sampling temperature.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most probable tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Sample from the nucleus of this mass (1: all).")
    flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")
    flags.DEFINE_integer("num_samples", 1, "Texts to generate from the prompt.")
    flags.DEFINE_string("step", "latest", "Checkpoint step of a run, or 'latest'.")
    flags.mark_flags_as_required(["workdir", "prompt"])


@dataclasses.dataclass(frozen=True)
class SamplingFlags:
    """The sampling settings of the command line, checked (`check_sampling_flags`)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    num_samples: int


def check_sampling_flags(
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    num_samples: int,
) -> SamplingFlags:
    """The settings, or a ``ConfigError`` naming the first flag out of its range."""
    problems = (
        (max_new_tokens < 1, f"--max_new_tokens={max_new_tokens}: must be at least 1"),
        (
            not temperature >= 0,
            f"--temperature={temperature}: must be >= 0 (0 decodes greedily)",
        ),
        (top_k < 0, f"--top_k={top_k}: must be >= 0 (0 keeps every token)"),
        (not 0 < top_p <= 1, f"--top_p={top_p}: must be in (0, 1] (1 keeps every token)"),
        (num_samples < 1, f"--num_samples={num_samples}: must be at least 1"),
    )
    for bad, message in problems:
        if bad:
            raise ConfigError(f"{message}.")
    return SamplingFlags(max_new_tokens, temperature, top_k, top_p, seed, num_samples)


def parse_step(step: str) -> int | None:
    """``--step``: None for 'latest', else a non-negative integer."""
    if step.strip().lower() == "latest":
        return None
    try:
        value = int(step)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"--step={step!r}: give a checkpoint step (an integer) or 'latest'.")
    return value


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A decoder ready to sample: model, params, tokenizer and its end-of-document ids."""

    model: Any
    params: Any
    tokenizer: tokenizers.Tokenizer
    eos_ids: tuple[int, ...]


def _refuse_encoder(config: Any, spec: str) -> None:
    if config.objective != "clm":
        raise ConfigError(
            f"{FIELD}: {spec} is an encoder ({config.family}, masked LM), which cannot "
            "generate text; give a gpt2/llama-family run (configs/causal.py) or hf:DIR of "
            "a *ForCausalLM model."
        )


def plan_decoder(spec: str, step: int | None) -> tuple[TeacherPlan, tokenizers.Tokenizer]:
    """(the teacher plan of the decoder ``spec`` names, its tokenizer), checked by its
    files only; an encoder, a missing run or step is a ``ConfigError`` naming
    ``--workdir`` / ``--step``."""
    from dwt_jax import hf, readers
    from dwt_jax import teachers as teachers_lib

    if hf.is_hf(spec):
        if step is not None:
            raise ConfigError(f"--step={step}: {spec} is a Hugging Face directory, not a run.")
        try:
            checkpoint = hf.plan(spec, FIELD, "clm")
        except hf.HFConversionError as e:
            raise ConfigError(str(e)) from None
        if not checkpoint.has_lm_head:
            raise ConfigError(
                f"{FIELD}: {checkpoint.path} has no LM head ({checkpoint.lm_head_key}); "
                "use the checkpoint saved as *ForCausalLM."
            )
        plan = teachers_lib.TeacherPlan(spec, checkpoint.config, 0, checkpoint)
        return plan, teachers_lib.hf_tokenizer(checkpoint.path, FIELD)
    saved = teachers_lib.read_run_config(spec, FIELD)
    _refuse_encoder(teachers_lib.saved_model_config(saved, spec, FIELD), spec)
    plan = teachers_lib.plan_teacher(spec, FIELD)
    if step is not None:
        if not os.path.isdir(os.path.join(spec, teachers_lib.TEACHER_CHECKPOINT_DIR, str(step))):
            raise ConfigError(
                f"--step={step}: {spec} has no checkpoint {step} (latest: {plan.step})."
            )
        plan = dataclasses.replace(plan, step=step)
    tokenizer_file = os.path.join(spec, teachers_lib.TEACHER_TOKENIZER_FILE)
    return plan, readers.load_tokenizer_file(tokenizer_file, FIELD)


def special_ids(
    tokenizer: tokenizers.Tokenizer, hf_config: dict[str, Any] | None
) -> tuple[int | None, tuple[int, ...]]:
    """(beginning-of-document id or None, end-of-document ids): the causal packer's
    names (`dwt_jax.data.tokenizer`); a Hugging Face config's ``eos_token_id`` (one
    or a list) when it gives one."""
    from dwt_jax.data.tokenizer import BOS_NAMES, EOS_NAMES

    def first(names: tuple[str, ...]) -> int | None:
        found = [tokenizer.token_to_id(n) for n in names if tokenizer.token_to_id(n) is not None]
        return int(found[0]) if found else None

    eos = (hf_config or {}).get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos) if isinstance(eos, list) else []
    if not eos_ids and first(EOS_NAMES) is not None:
        eos_ids = [first(EOS_NAMES)]
    return first(BOS_NAMES), tuple(int(i) for i in eos_ids if isinstance(i, int) and i >= 0)


def encode_prompt(tokenizer: tokenizers.Tokenizer, bos_id: int | None, prompt: str) -> list[int]:
    """The prompt's ids: its tokens (no template), after ``bos_id`` when there is one."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    return ([bos_id] if bos_id is not None else []) + list(ids)


def check_prompt_length(num_ids: int, max_new_tokens: int, config: DecoderConfig) -> None:
    """The prompt and the new tokens must fit the model's ``max_len`` (and its attention
    window: the model attends to every earlier token, which is exact only within it)."""
    limit, what = config.max_len, f"max_len={config.max_len}"
    if 0 < config.sliding_window < limit:
        limit, what = config.sliding_window, f"sliding_window={config.sliding_window}"
    if num_ids == 0:
        raise ConfigError("--prompt: the tokenizer encodes it to no tokens; give some text.")
    if num_ids >= limit:
        raise ConfigError(
            f"--prompt: {num_ids} tokens, but the model's {what} leaves no room for a new "
            "token; give a shorter prompt."
        )
    if num_ids + max_new_tokens > limit:
        raise ConfigError(
            f"--max_new_tokens={max_new_tokens}: with the prompt's {num_ids} tokens it passes "
            f"the model's {what}; use at most --max_new_tokens={limit - num_ids}."
        )


def load_decoder(
    plan: TeacherPlan, tokenizer: tokenizers.Tokenizer, eos_ids: tuple[int, ...]
) -> Decoder:
    """Loads the planned decoder's parameters onto one device."""
    import jax
    import ml_collections

    from dwt_jax import sharding
    from dwt_jax import teachers as teachers_lib

    mesh = sharding.make_mesh(
        ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1]
    )
    teacher = teachers_lib.load_teacher(plan, mesh, FIELD)
    return Decoder(teacher.model, teacher.params, tokenizer, eos_ids)


def generate_texts(decoder: Decoder, prompt_ids: list[int], settings: SamplingFlags) -> list[str]:
    """``settings.num_samples`` decoded texts (prompt and continuation) of the prompt."""
    import jax
    import numpy as np

    from dwt_jax.models.sampling import generate_tokens

    prompt_ids_BxP = np.tile(np.asarray(prompt_ids, np.int32), (settings.num_samples, 1))
    start = time.perf_counter()
    tokens_BxT = generate_tokens(
        decoder.model,
        decoder.params,
        prompt_ids_BxP,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        seed=settings.seed,
        eos_id=decoder.eos_ids or None,
    )
    tokens_BxT = np.asarray(jax.device_get(tokens_BxT))
    seconds = time.perf_counter() - start
    logging.info(
        "generated %d x %d tokens in %.2f s (compilation included)",
        settings.num_samples,
        settings.max_new_tokens,
        seconds,
    )
    texts = []
    for row in tokens_BxT:
        ids = [int(i) for i in row]
        for position in range(len(prompt_ids), len(ids)):  # Cut after the first eos.
            if ids[position] in decoder.eos_ids:
                ids = ids[: position + 1]
                break
        texts.append(decoder.tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def main(argv: list[str]) -> None:
    """CLI: flags → checks (one line, exit 2, on a bad one) → load → sample → print."""
    del argv  # The flag parser refused positional arguments.
    f = flags.FLAGS
    settings = check_sampling_flags(
        f.max_new_tokens, f.temperature, f.top_k, f.top_p, f.seed, f.num_samples
    )
    if not f.prompt.strip():
        raise ConfigError("--prompt is empty; give the text to continue, e.g. --prompt='Once'.")
    step = parse_step(f.step)
    plan, tokenizer = plan_decoder(f.workdir, step)
    bos_id, eos_ids = special_ids(tokenizer, plan.hf.raw_config if plan.hf is not None else None)
    prompt_ids = encode_prompt(tokenizer, bos_id, f.prompt)
    check_prompt_length(len(prompt_ids), settings.max_new_tokens, plan.config)
    decoder = load_decoder(plan, tokenizer, eos_ids)
    texts = generate_texts(decoder, prompt_ids, settings)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"[sample {i + 1}]")
        print(text, flush=True)


def run_cli() -> None:
    """The entry point of ``python -m dwt_jax.generate``."""
    _define_flags()
    cli.run(main, _EXAMPLES)


if __name__ == "__main__":
    run_cli()
