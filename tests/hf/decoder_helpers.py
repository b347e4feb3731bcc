"""Helpers of the decoder Hugging Face tests: tiny randomly initialised transformers causal
LMs of every supported family, written by ``save_pretrained`` on first use (one per
kind and test session), a batch with padding and a packed row, our model's logits, and
a tiny byte-level BPE tokenizer with ``<|endoftext|>``.

Every parameter is perturbed away from its initial value (norm scales 1, biases 0), so
a transform that dropped or swapped one of them could not go unnoticed.
"""

from __future__ import annotations

import functools
import os

import flax
import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from dwt_jax import hf
from dwt_jax.models.families import make_lm
from dwt_jax.state import dummy_inputs

VOCAB, LENGTH, MAX_LEN = 128, 16, 32
# Row 0: one document filling the row; row 1: document B alone, then padding; row 2:
# document A (7 tokens) packed with document B (9 tokens).
DOC_A, DOC_B = 7, LENGTH - 7


def _llama_sizes(**extra):
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=MAX_LEN,
        **extra,
    )


LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Short enough that the scaling changes every frequency band of 8-wide heads.
    "original_max_position_embeddings": 16,
}

# kind -> (transformers config, model class).
KINDS = {
    "gpt2": lambda: (
        transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_LEN
        ),
        transformers.GPT2LMHeadModel,
    ),
    "llama_gqa": lambda: (
        transformers.LlamaConfig(
            **_llama_sizes(
                num_key_value_heads=2,
                tie_word_embeddings=False,
                rope_theta=500.0,
                rms_norm_eps=1e-5,
            )
        ),
        transformers.LlamaForCausalLM,
    ),
    "llama_tied": lambda: (
        transformers.LlamaConfig(**_llama_sizes(num_key_value_heads=1, tie_word_embeddings=True)),
        transformers.LlamaForCausalLM,
    ),
    "qwen2": lambda: (
        transformers.Qwen2Config(**_llama_sizes(num_key_value_heads=2)),
        transformers.Qwen2ForCausalLM,
    ),
    "qwen3": lambda: (
        transformers.Qwen3Config(
            **_llama_sizes(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
        ),
        transformers.Qwen3ForCausalLM,
    ),
    "mistral": lambda: (
        transformers.MistralConfig(**_llama_sizes(num_key_value_heads=2, sliding_window=MAX_LEN)),
        transformers.MistralForCausalLM,
    ),
    "llama3_rope": lambda: (
        transformers.LlamaConfig(**_llama_sizes(num_key_value_heads=2, rope_parameters=LLAMA3)),
        transformers.LlamaForCausalLM,
    ),
}


def make_hf_decoder(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny seeded transformers causal LM of ``kind`` with perturbed parameters."""
    config, cls = KINDS[kind]()
    torch.manual_seed(seed)
    model = cls(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


class DecoderDirs:
    """kind -> (directory written by save_pretrained, the transformers model), built on
    first use."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._made: dict[str, tuple[str, torch.nn.Module]] = {}

    def __getitem__(self, kind: str) -> tuple[str, torch.nn.Module]:
        if kind not in self._made:
            model = make_hf_decoder(kind, seed=list(KINDS).index(kind))
            path = os.path.join(self.root, kind)
            model.save_pretrained(path)
            self._made[kind] = (path, model)
        return self._made[kind]


@pytest.fixture(scope="session", name="decoder_dirs")
def decoder_dirs_fixture(tmp_path_factory) -> DecoderDirs:
    """The session's ``DecoderDirs`` (test modules import this function by name)."""
    return DecoderDirs(str(tmp_path_factory.mktemp("decoders")))


def template(config) -> dict:
    """Our model's param tree as shapes (all that loading needs)."""
    model = make_lm(config)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), **dummy_inputs(model, 8), deterministic=True)
    )
    return flax.linen.unbox(abstract["params"])


def load(path: str, **kwargs):
    """(checkpoint, our params, report) of the directory ``path``."""
    checkpoint = hf.plan(f"hf:{path}", "test")
    params, report = hf.load_params(checkpoint, template(checkpoint.config), **kwargs)
    return checkpoint, params, report


def batch() -> dict[str, np.ndarray]:
    """Rows as described at ``DOC_A``: ids, our segment ids and positions, and the
    transformers attention mask (1 on real tokens)."""
    rng = np.random.default_rng(0)
    doc_a, doc_b, full = (rng.integers(1, VOCAB, n) for n in (DOC_A, DOC_B, LENGTH))
    ids = np.zeros((3, LENGTH), np.int64)
    ids[0] = full
    ids[1, :DOC_B] = doc_b
    ids[2] = np.concatenate([doc_a, doc_b])
    segments = np.zeros((3, LENGTH), np.int32)
    segments[0] = 1
    segments[1, :DOC_B] = 1
    segments[2] = [1] * DOC_A + [2] * DOC_B
    positions = np.zeros((3, LENGTH), np.int32)
    positions[0] = np.arange(LENGTH)
    positions[1, :DOC_B] = np.arange(DOC_B)
    positions[2] = np.concatenate([np.arange(DOC_A), np.arange(DOC_B)])
    return {
        "input_ids": ids,
        "segment_ids": segments,
        "positions": positions,
        "attention_mask": (segments > 0).astype(np.int64),
    }


@functools.cache
def _forward(config):
    model = make_lm(config)
    return jax.jit(
        lambda params, ids, segments, positions: model.apply(
            {"params": params},
            input_ids=ids,
            segment_ids=segments,
            positions=positions,
            deterministic=True,
        )[0]
    )


def our_logits(config, params, rows: dict[str, np.ndarray]) -> np.ndarray:
    """Our float32 logits [B, L, V] (one compiled function per config)."""
    logits = _forward(config)(
        params, rows["input_ids"].astype(np.int32), rows["segment_ids"], rows["positions"]
    )
    return np.asarray(logits)


def their_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits.numpy()


def max_diff_on(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """max |a - b| over the positions where ``mask`` is 1."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(np.where(mask[..., None] == 1, diff, 0.0).max())


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in character of every byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_bpe_tokenizer() -> tokenizers.Tokenizer:
    """A tiny GPT-2-style byte-level BPE: ``<|endoftext|>`` = 0, printable ASCII bytes,
    three merges (fewer ids than ``VOCAB``)."""
    chars = _byte_alphabet()
    vocab = {"<|endoftext|>": 0}
    for b in range(32, 127):
        vocab[chars[b]] = len(vocab)
    merges = [("t", "h"), ("th", "e"), (chars[32], "t")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer
