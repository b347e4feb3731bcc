"""Generation: the KV-cache sampler (`dwt_jax.models.sampling`) and the
``python -m dwt_jax.generate`` command line.

- cached greedy decoding equals greedy decoding by the full, uncached forward on the
  growing sequence (tokens, and logits within 1e-5), for a GQA Llama and a GPT-2;
- top_k=1 is greedy; one seed gives one sample, another seed another; top-k/top-p
  filters against a NumPy reference; end-of-sequence rows keep emitting eos;
- one compilation per shape, whatever the sampling settings;
- Hugging Face's ``generate(do_sample=False)`` on tiny random GPT-2 and Llama models
  written by transformers, loaded through ``hf:DIR``: the same tokens;
- the CLI prints text and exits 0; a bad command line is one error line, exit 2.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from testutil import load_config

from dwt_jax.models import sampling
from dwt_jax.models.decoder_config import DecoderConfig
from dwt_jax.models.families import make_lm

VOCAB, MAX_LEN, PROMPT, NEW = 96, 32, 5, 9
# The tiny models' configs, as `hf:DIR` converts the transformers models written below:
# equal configs share one compiled sampler (a test and its Hugging Face twin).
CONFIGS = {
    "llama": DecoderConfig(
        family="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,  # Grouped-query attention.
        mlp_dim=64,
        max_len=MAX_LEN,
        norm_eps=1e-6,
        tie_embeddings=False,
        initializer_range=0.2,
    ),
    "gpt2": DecoderConfig(
        family="gpt2",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=128,
        max_len=MAX_LEN,
        dropout_rate=0.1,
        initializer_range=0.2,
    ),
}


def _tiny(family: str) -> tuple[nn.Module, dict]:
    config = CONFIGS[family]
    model = make_lm(config)
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0),
            input_ids=ids,
            segment_ids=jnp.ones_like(ids),
            positions=jnp.arange(4)[None],
            deterministic=True,
        )
    )["params"]
    # Random NumPy values by shape: no compiled init. Norm scales near 1.
    rng = np.random.default_rng(7)

    def value(path, leaf):
        noise = rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)
        return noise / 3 + 1 if path[-1].key == "scale" else noise

    return model, jax.tree_util.tree_map_with_path(value, nn.unbox(shapes))


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[nn.Module, dict]]:
    return {family: _tiny(family) for family in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def prompts() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, PROMPT)).astype(np.int32)


def _uncached_greedy(model, params, prompt_BxP, steps):
    """Greedy decoding by the full forward on the growing sequence (no cache): one
    [B, MAX_LEN] program whose padding (segment 0) no real token attends to."""

    @jax.jit
    def last_logits(ids_BxT, length):
        segment_ids = (jnp.arange(MAX_LEN) < length).astype(jnp.int32)[None].repeat(2, 0)
        logits, _ = model.apply(
            {"params": params},
            input_ids=ids_BxT,
            segment_ids=segment_ids,
            positions=jnp.broadcast_to(jnp.arange(MAX_LEN), ids_BxT.shape),
            deterministic=True,
        )
        return logits[:, length - 1]

    ids = np.zeros((prompt_BxP.shape[0], MAX_LEN), np.int32)
    ids[:, :PROMPT] = prompt_BxP
    all_logits = []
    for t in range(PROMPT, PROMPT + steps):
        logits_BxV = np.asarray(last_logits(jnp.asarray(ids), t))
        all_logits.append(logits_BxV)
        ids[:, t] = logits_BxV.argmax(-1)
    return ids[:, : PROMPT + steps], np.stack(all_logits, 1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_greedy_equals_uncached_greedy(models, prompts, family):
    model, params = models[family]
    tokens, logits = sampling.generate_tokens(
        model, params, prompts, max_new_tokens=NEW, temperature=0.0, return_logits=True
    )
    want_tokens, want_logits = _uncached_greedy(model, params, prompts, NEW)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-5, rtol=0)
    assert len(set(want_tokens[:, PROMPT:].ravel().tolist())) > 2  # Not a degenerate path.


def _generate(models, prompts, **kwargs):
    """The Llama's tokens; with its logits too, so every test shares one program."""
    model, params = models["llama"]
    tokens, _ = sampling.generate_tokens(
        model, params, prompts, max_new_tokens=NEW, return_logits=True, **kwargs
    )
    return np.asarray(tokens)


def test_top_k_one_is_greedy_and_seeds_decide_samples(models, prompts):
    greedy = _generate(models, prompts, temperature=0.0)
    np.testing.assert_array_equal(_generate(models, prompts, top_k=1, seed=3), greedy)
    first = _generate(models, prompts, temperature=1.5, top_p=0.95, seed=1)
    np.testing.assert_array_equal(
        _generate(models, prompts, temperature=1.5, top_p=0.95, seed=1), first
    )
    other = _generate(models, prompts, temperature=1.5, top_p=0.95, seed=2)
    assert (other[:, PROMPT:] != first[:, PROMPT:]).any()
    assert (first[:, PROMPT:] != greedy[:, PROMPT:]).any()
    np.testing.assert_array_equal(first[:, :PROMPT], prompts)


def test_samples_stay_in_the_top_k_and_the_nucleus(models, prompts):
    model, params = models["llama"]

    def sample(**kwargs):
        tokens, logits = sampling.generate_tokens(
            model, params, prompts, max_new_tokens=NEW, return_logits=True, **kwargs
        )
        new_BxN = np.asarray(tokens)[:, PROMPT:]
        picked_BxN = np.take_along_axis(np.asarray(logits), new_BxN[..., None], -1)[..., 0]
        return new_BxN, np.asarray(logits), picked_BxN

    new, logits, picked = sample(temperature=3.0, top_k=3, seed=5)
    assert ((logits > picked[..., None]).sum(-1) < 3).all()  # Always one of the top 3.
    assert (new != logits.argmax(-1)).any()  # Not greedy.
    new, logits, _ = sample(temperature=2.0, top_p=0.5, seed=6)
    probs = np.exp(logits / 2.0 - logits.max(-1, keepdims=True) / 2.0)
    probs /= probs.sum(-1, keepdims=True)
    for b, i in np.ndindex(new.shape):
        assert _numpy_top_p(probs[b, i], 0.5)[new[b, i]], (b, i)


def test_rows_keep_emitting_eos_after_it(models, prompts):
    greedy = _generate(models, prompts, temperature=0.0)
    eos = int(greedy[0, PROMPT + 2])  # Row 0 emits it third (or earlier).
    out = _generate(models, prompts, temperature=0.0, eos_id=[eos, VOCAB - 1])
    for row in range(2):
        hits = np.flatnonzero(np.isin(greedy[row, PROMPT:], [eos, VOCAB - 1]))
        end = PROMPT + (hits[0] + 1 if hits.size else NEW)
        np.testing.assert_array_equal(out[row, :end], greedy[row, :end])
        assert (out[row, end:] == eos).all()
    assert (out[0, PROMPT + 3 :] == eos).all()


def _numpy_top_p(probs: np.ndarray, p: float) -> np.ndarray:
    """The nucleus by its definition: the most probable tokens, in order, until their
    mass reaches p (a token tied with the last one kept is kept too)."""
    order = np.argsort(-probs, kind="stable")
    mass = np.cumsum(probs[order])
    last = probs[order[int(np.searchsorted(mass, p - 1e-7))]] if p < 1 else 0.0
    return probs >= last


def test_top_p_keeps_the_smallest_set_of_mass_p():
    top_p_mask = jax.jit(sampling.top_p_mask)  # One program per shape, p traced.
    probs = np.array([0.1, 0.5, 0.05, 0.2, 0.15], np.float32)
    for p, kept in [
        (0.3, [1]),
        (0.6, [1, 3]),
        (0.71, [1, 3, 4]),
        (0.9, [0, 1, 3, 4]),
        (1.0, range(5)),
    ]:
        mask = np.asarray(top_p_mask(jnp.asarray(probs)[None], p))[0]
        np.testing.assert_array_equal(np.flatnonzero(mask), sorted(kept), err_msg=f"p={p}")
    ties = np.asarray(top_p_mask(jnp.asarray([[0.3, 0.4, 0.3]]), 0.5))[0]
    assert ties.all()  # 0.4 + either 0.3 reaches 0.5; neither 0.3 is preferred.
    rng = np.random.default_rng(1)
    probs_BxV = rng.dirichlet(np.full(40, 0.3), size=16).astype(np.float32)
    for p in (0.2, 0.5, 0.9, 0.99):
        got = np.asarray(top_p_mask(jnp.asarray(probs_BxV), p))
        want = np.stack([_numpy_top_p(row, p) for row in probs_BxV])
        np.testing.assert_array_equal(got, want, err_msg=f"p={p}")
    logits = jnp.log(jnp.asarray(probs))[None]
    filtered = np.asarray(jax.jit(sampling.top_p_filter)(logits, 0.6))[0]
    assert np.isfinite(filtered[[1, 3]]).all() and np.isneginf(filtered[[0, 2, 4]]).all()


def test_top_k_filter_keeps_the_k_largest():
    logits = jnp.asarray([[0.5, 3.0, -1.0, 2.0, 1.0], [1.0, 1.0, 0.0, 2.0, -3.0]])
    top_k_filter = jax.jit(sampling.top_k_filter)  # One program, k traced.
    got = np.isfinite(np.asarray(top_k_filter(logits, 2)))
    np.testing.assert_array_equal(got, [[0, 1, 0, 1, 0], [1, 1, 0, 1, 0]])  # Ties kept.
    assert np.isfinite(np.asarray(top_k_filter(logits, 0))).all()
    assert np.isfinite(np.asarray(top_k_filter(logits, 1))).sum() == 2


def test_compiled_once_per_shape(models, prompts):
    """New settings, seeds and eos ids of one shape reuse one compiled program."""
    events: list[str] = []

    def listen(name: str, *args, **kwargs) -> None:
        if name.startswith("/jax/core/compile/"):
            events.append(name)

    _generate(models, prompts, temperature=0.0)  # Compiled here, or by an earlier test.
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        _generate(models, prompts, temperature=0.7, top_k=5, top_p=0.9, seed=11, eos_id=3)
        _generate(models, prompts, temperature=1.0, seed=12, eos_id=[4, 5])
        assert not events, f"recompiled for new settings: {events}"
        jax.jit(lambda x: x * 3 + 1)(jnp.ones(3))
        assert events, "the listener hears compilations"
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


# --- Hugging Face models through hf:DIR, and the command line ----------------------------


def _write_hf_decoder(directory: str, family: str):
    """A tiny random transformers causal LM of ``CONFIGS[family]``'s shape and a
    word-level tokenizer (``w0 ... w93``, end of text ``<|endoftext|>`` = 0; the
    Llama's beginning of text ``<s>`` = 1), saved into ``directory``."""
    import tokenizers
    import torch
    import transformers

    words = ["<|endoftext|>", "<s>" if family == "llama" else "x", *(f"w{i}" for i in range(94))]
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    special = {"eos_token": "<|endoftext|>", **({"bos_token": "<s>"} if family == "llama" else {})}
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(
        directory
    )
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": 0}
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=MAX_LEN,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            **common,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=MAX_LEN, **common
        )
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # Norms and biases away from (1, 0): a dropped one would show.
        for weight in model.parameters():
            weight.add_(0.1 * torch.randn(weight.shape))
    model.eval().save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[str, object]]:
    """family -> (the hf:DIR directory, its transformers model)."""
    dirs = {}
    for family in ("llama", "gpt2"):
        directory = str(tmp_path_factory.mktemp(f"hf_{family}"))
        dirs[family] = (directory, _write_hf_decoder(directory, family))
    return dirs


def _hf_greedy(model, prompt_BxP: np.ndarray, new: int, eos: int | None) -> np.ndarray:
    """transformers' greedy ``generate``; rows that ended hold ``eos`` to the end."""
    import torch

    ids = torch.from_numpy(prompt_BxP.astype(np.int64))
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            eos_token_id=eos,
            pad_token_id=0 if eos is None else eos,
        ).numpy()
    width = prompt_BxP.shape[1] + new - out.shape[1]  # All rows ended early.
    return np.pad(out, ((0, 0), (0, width)), constant_values=0 if eos is None else eos)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_transformers_generate(hf_dirs, prompts, family):
    from dwt_jax import generate

    directory, hf_model = hf_dirs[family]
    plan, tokenizer = generate.plan_decoder(f"hf:{directory}", None)
    decoder = generate.load_decoder(plan, tokenizer, ())

    def ours(eos: int | None) -> np.ndarray:
        tokens, _ = sampling.generate_tokens(
            decoder.model,
            decoder.params,
            prompts,
            max_new_tokens=NEW,
            temperature=0.0,
            eos_id=eos,
            return_logits=True,  # As the tests above: one program.
        )
        return np.asarray(tokens)

    want = _hf_greedy(hf_model, prompts, NEW, None)
    np.testing.assert_array_equal(ours(None), want)
    assert len(set(want[:, PROMPT:].ravel().tolist())) > 2  # Not a degenerate path.
    eos = int(want[0, PROMPT + 2])  # Row 0 ends by its third new token.
    got = ours(eos)
    np.testing.assert_array_equal(got, _hf_greedy(hf_model, prompts, NEW, eos))
    assert (got[0, PROMPT + 3 :] == eos).all()


def test_command_line(hf_dirs, tmp_path):
    import cli_forks
    import tokenizers
    import transformers

    llama_dir, llama = hf_dirs["llama"]
    bert_dir = str(tmp_path / "bert")
    transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1).save_pretrained(
        bert_dir
    )
    bert_run = tmp_path / "bert_run"  # A BERT pre-training run's saved config.
    bert_run.mkdir()
    model_section = load_config("smoke").model.to_dict()
    (bert_run / "config.json").write_text(json.dumps({"mode": "pretrain", "model": model_section}))
    base = [f"--workdir=hf:{llama_dir}", "--prompt=w3 w4 w5"]
    module = "dwt_jax.generate"
    spec = {
        "greedy": {"argv": [*base, "--max_new_tokens=6", "--num_samples=2"], "module": module},
        "top_p": {"argv": [*base, "--top_p=0"], "module": module},
        "not_int": {"argv": [*base, "--max_new_tokens=many"], "module": module},
        "empty": {"argv": [base[0], "--prompt= "], "module": module},
        "missing": {"argv": ["--workdir=/no/such/run", base[1]], "module": module},
        "encoder": {"argv": [f"--workdir=hf:{bert_dir}", base[1]], "module": module},
        "encoder_run": {"argv": [f"--workdir={bert_run}", base[1]], "module": module},
        "too_long": {"argv": [base[0], "--prompt=" + "w7 " * MAX_LEN], "module": module},
    }
    results = cli_forks.run_cases(spec, str(tmp_path), __file__)
    fields = {
        "top_p": "--top_p",
        "not_int": "--max_new_tokens",
        "empty": "--prompt",
        "missing": "--workdir",
        "encoder": "--workdir",
        "encoder_run": "--workdir",
        "too_long": "--prompt",
    }
    for name, field in fields.items():
        cli_forks.assert_one_error_line(results[name], field, name)
    greedy = results["greedy"]
    assert greedy["rc"] == 0, greedy["stderr"][-3000:]
    # The same text as transformers' greedy generate from <s> w3 w4 w5, cut at eos.
    tokenizer = tokenizers.Tokenizer.from_file(f"{llama_dir}/tokenizer.json")
    prompt = np.asarray([[1, *tokenizer.encode("w3 w4 w5", add_special_tokens=False).ids]])
    ids = _hf_greedy(llama, prompt, 6, eos=0)[0].tolist()
    ids = ids[: ids.index(0) + 1] if 0 in ids[prompt.shape[1] :] else ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("w3 w4 w5 ")
    assert greedy["stdout"] == f"[sample 1]\n{text}\n[sample 2]\n{text}\n"


if __name__ == "__main__":  # The CLI tests' driver (tests/cli_forks.py).
    import cli_forks
    import transformers

    # Imported once here, shared by every forked command line (transformers' tokenizer
    # classes load lazily: a few seconds per child otherwise).
    _ = (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast)
    modules = ("dwt_jax.generate", "dwt_jax.teachers", "dwt_jax.models.sampling")
    cli_forks.drive(sys.argv[1], sys.argv[2], modules=modules)
