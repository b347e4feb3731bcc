"""PyTorch reference training steps for the causal DWT train-step benchmark.

    python benchmarks/torch_causal_reference.py               # both references, default shapes
    python benchmarks/torch_causal_reference.py --kinds=b --no-compile --steps=3

Both references do one full distillation training step of a Llama causal-LM student
(``transformers.LlamaForCausalLM``) against a smaller Llama teacher (run without
gradients, eval mode), with the loss of the JAX causal DWT step at α_h = α_s = τ = 1::

    L = CE(student, next tokens) + KL(p_teacher || p_student)

each term a mean over the predicted positions (every position but each row's last:
one document per row, no padding), the KL summed over the vocabulary; then
global-norm gradient clipping and AdamW with the JAX step's hyperparameters (from
the config: ``Setup``) and its decay mask (no weight decay on the RMSNorm scales, the
embedding table, which the tied LM head shares, or biases), at a constant learning
rate. Float32 throughout, dropout 0, ``use_cache=False``. The batch is fixed and
random: token ids in ``[3, vocab)`` drawn as ``benchmarks/step.py`` draws ours.

(a) "as most users write it": ``LlamaForCausalLM(input_ids, labels=input_ids)``
    (transformers' own shifted CE over the full ``[B, L, V]`` logits), the teacher's
    ``[B, L, V]`` logits under ``torch.no_grad()``, the KL on the ``[B, L-1, V]``
    log-softmaxes of both; ``torch.optim.AdamW`` (default implementation),
    ``clip_grad_norm_``, ``zero_grad(set_to_none=True)``. Eager; the default HF
    attention (SDPA in transformers 5).

(b) "as a skilled engineer writes it": the same models (same initial parameters for a
    given seed), but ``model.model(...)`` gives the final-normed hidden states and the
    LM heads, the CE and the KL run fused in vocabulary slices of ``vocab_chunk``
    entries (:class:`ChunkedHeadLoss`, the fused-linear-loss technique of Liger
    Kernel and Apple's cut-cross-entropy): no ``[B, L, V]`` array exists. A first pass
    over the slices takes both log-sum-exps; a second recomputes each slice's logits
    and computes the loss and, right there, its gradients with respect to the student's
    hidden states and head weights (a scalar loss: the backward pass only scales
    them). The one-hot part of the CE gradient is a sparse update (the label rows).
    The loss function (student forward, teacher forward under ``torch.no_grad()``,
    fused head) is one ``torch.compile`` graph; clipping is ``foreach`` and AdamW the
    ``fused`` kernel.

Both passes of (b) compute the logits of every slice, as the JAX step's fused head
does (its backward recomputes them): the same matmul count. Chunking over tokens
instead (Liger's fused linear cross-entropy: each block of rows against the whole
vocabulary, one pass) computes each logit once, at the price of a ``[rows, V]`` block.

Tried for (b) at the default shapes on the 2-core development machine, in a quiet
spell (others share it; minimum step times): eager 1.18 s/step, ``torch.compile``
0.92 s (kept), and the token-chunked variant (256-row blocks, compiled) 0.87 s (not
kept: the issue asks for vocabulary slices, the JAX step's technique). The fused head
alone (forward + backward, student and teacher, 2048-entry slices) took 0.71 s
compiled against 0.70 s for its matmuls alone. While another process kept one core
busy, the same (b) step took 4.7 s: the OpenMP work split of PyTorch's CPU kernels
waits for the thread that shares its core, so on a loaded machine the references
slow down far more than the JAX step (XLA's thread pool balances its tasks).

``torch.compile`` needs a C++ compiler and the Python headers (inductor's CPU backend);
without them use ``compile=False``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import transformers
from torch.nn import functional

KINDS = ("a", "b")
LAYOUT = "layers hidden heads kv_heads mlp"


def _sibling(name: str):
    """benchmarks/<name>.py as a module (this directory is not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"dwt_jax_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Its dataclass resolves annotations there.
    spec.loader.exec_module(module)
    return module


torch_reference = _sibling("torch_reference")


@dataclasses.dataclass(frozen=True)
class Setup:
    """Model sizes (layers, hidden, heads, KV heads, MLP), batch shape, the fused
    head's vocabulary slice and the optimiser of the benchmark (``configs/causal.py``'s
    models and optimiser at the issue's vocabulary and batch)."""

    student: tuple[int, int, int, int, int] = (4, 256, 4, 2, 688)
    teacher: tuple[int, int, int, int, int] = (2, 128, 4, 2, 344)
    vocab: int = 32000
    batch: int = 8
    seq_len: int = 256
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    vocab_chunk: int = 2048
    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-6
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # (student, teacher) parameter counts the models must have (the JAX models'), or None.
    expect_params: tuple[int, int] | None = None


def llama_config(sizes: tuple[int, int, int, int, int], setup: Setup) -> transformers.LlamaConfig:
    """An HF Llama config of ``sizes`` = (layers, hidden, heads, kv_heads, mlp)."""
    layers, hidden, heads, kv_heads, mlp = sizes
    return transformers.LlamaConfig(
        vocab_size=setup.vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=mlp,
        max_position_embeddings=setup.seq_len,
        rms_norm_eps=setup.norm_eps,
        rope_theta=setup.rope_theta,
        tie_word_embeddings=setup.tie_embeddings,
        attention_dropout=0.0,
        use_cache=False,
    )


def token_ids(vocab: int, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """The fixed random batch ``[batch, seq_len]`` (``benchmarks/step.py`` draws the
    same ids for the JAX step)."""
    return np.random.default_rng(seed).integers(3, vocab, (batch, seq_len)).astype(np.int32)


def make_models(
    setup: Setup, seed: int
) -> tuple[transformers.LlamaForCausalLM, transformers.LlamaForCausalLM]:
    """(student in train mode, teacher in eval mode without gradients), seeded."""
    torch.manual_seed(seed)
    student = transformers.LlamaForCausalLM(llama_config(setup.student, setup))
    teacher = transformers.LlamaForCausalLM(llama_config(setup.teacher, setup))
    counts = (parameter_count(student), parameter_count(teacher))
    if setup.expect_params is not None and counts != tuple(setup.expect_params):
        raise ValueError(
            f"the PyTorch student and teacher have {counts[0]:,} and {counts[1]:,} "
            f"parameters, the JAX ones {setup.expect_params[0]:,} and "
            f"{setup.expect_params[1]:,}: the models differ (see Setup and llama_config)."
        )
    student.train()
    teacher.eval().requires_grad_(False)
    return student, teacher


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay except on biases, norms and the embedding table."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # A tied head is listed once.
        skip = name.endswith("bias") or "norm" in name or "embed_tokens" in name
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _optimizer(student: torch.nn.Module, setup: Setup, **kwargs) -> torch.optim.AdamW:
    groups = parameter_groups(student, setup.weight_decay)
    betas = (setup.b1, setup.b2)
    return torch.optim.AdamW(groups, setup.learning_rate, betas, setup.eps, **kwargs)


class ChunkedHeadLoss(torch.autograd.Function):
    """``mean CE(h @ Wᵀ, targets) + mean KL(softmax(h_t @ W_tᵀ) ‖ softmax(h @ Wᵀ))`` over
    the rows, computed ``chunk`` vocabulary entries at a time: memory O(N·chunk), no
    ``[N, V]`` logits. The gradients (of ``hidden`` and ``weight`` only: the teacher's
    are constants) are computed in the forward pass; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, targets, chunk: int):
        rows, vocab = hidden.shape[0], weight.shape[0]
        starts = range(0, vocab, chunk)
        lse_s = hidden.new_full((rows,), -float("inf"))
        lse_t = hidden.new_full((rows,), -float("inf"))
        for start in starts:  # Pass 1: the log-sum-exps.
            z = hidden @ weight[start : start + chunk].T
            a = t_hidden @ t_weight[start : start + chunk].T
            lse_s = torch.logaddexp(lse_s, torch.logsumexp(z, -1))
            lse_t = torch.logaddexp(lse_t, torch.logsumexp(a, -1))
        label_rows = weight[targets]  # [N, D]: each row's target embedding.
        ce = (lse_s - (hidden * label_rows).sum(-1)).mean()
        scale = 1.0 / rows
        kl = hidden.new_zeros(())
        grad_hidden = label_rows * -scale  # The one-hot part of ∂CE/∂z, sparse.
        grad_chunks = []
        for start in starts:  # Pass 2: the KL and both gradients, slice by slice.
            w = weight[start : start + chunk]
            log_q = hidden @ w.T - lse_s[:, None]
            log_p = t_hidden @ t_weight[start : start + chunk].T - lse_t[:, None]
            q, p = log_q.exp(), log_p.exp()
            kl = kl + (p * (log_p - log_q)).sum()
            grad_z = (2.0 * q - p) * scale  # ∂/∂z of CE (softmax part) + KL: q + (q − p).
            grad_hidden = grad_hidden + grad_z @ w
            grad_chunks.append(grad_z.T @ hidden)
        grad_weight = torch.cat(grad_chunks).index_add(0, targets, hidden, alpha=-scale)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return ce + kl * scale

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad, grad_weight * grad, None, None, None, None


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) summed over the vocabulary, mean over rows ``[N, V]``."""
    return functional.kl_div(
        functional.log_softmax(student_logits, -1),
        functional.log_softmax(teacher_logits, -1),
        reduction="batchmean",
        log_target=True,
    )


def _clip_and_step(params, optimizer, clip_norm: float, foreach: bool | None) -> Callable[[], None]:
    def update_fn() -> None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=foreach)
        optimizer.step()

    return update_fn


def _reference_a(setup: Setup, seed: int):
    student, teacher = make_models(setup, seed)
    input_ids = torch.as_tensor(token_ids(setup.vocab, setup.batch, setup.seq_len, seed)).long()
    optimizer = _optimizer(student, setup)

    def loss_fn() -> torch.Tensor:
        out = student(input_ids=input_ids, labels=input_ids)  # Shifted inside.
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids).logits
        return out.loss + kl_teacher_student(
            out.logits[:, :-1].flatten(0, 1), teacher_logits[:, :-1].flatten(0, 1)
        )

    update_fn = _clip_and_step(list(student.parameters()), optimizer, setup.clip_norm, None)
    batch = {"input_ids": input_ids}
    return torch_reference.ReferenceStep(
        loss_fn, update_fn, student, teacher, optimizer, batch, seed
    )


def _reference_b(setup: Setup, seed: int, compile: bool):
    student, teacher = make_models(setup, seed)
    input_ids = torch.as_tensor(token_ids(setup.vocab, setup.batch, setup.seq_len, seed)).long()
    targets = input_ids[:, 1:].flatten()
    optimizer = _optimizer(student, setup, fused=True)
    chunk = setup.vocab_chunk or setup.vocab

    def loss_fn() -> torch.Tensor:
        hidden = student.model(input_ids=input_ids).last_hidden_state  # [B, L, D]
        with torch.no_grad():
            t_hidden = teacher.model(input_ids=input_ids).last_hidden_state
        return ChunkedHeadLoss.apply(
            hidden[:, :-1].flatten(0, 1),
            student.lm_head.weight,
            t_hidden[:, :-1].flatten(0, 1),
            teacher.lm_head.weight,
            targets,
            chunk,
        )

    if compile:
        loss_fn = torch.compile(loss_fn)
    update_fn = _clip_and_step(list(student.parameters()), optimizer, setup.clip_norm, True)
    batch = {"input_ids": input_ids}
    return torch_reference.ReferenceStep(
        loss_fn, update_fn, student, teacher, optimizer, batch, seed
    )


def make_reference_step(kind: str, setup: Setup, *, seed: int = 0, compile: bool = True):
    """A ``ReferenceStep``: one full training step per call on a fixed random batch,
    returning the loss as a Python float.

    ``kind`` is ``"a"`` (stock HF, full ``[B, L, V]`` logits) or ``"b"`` (fused
    chunked LM heads and loss, ``torch.compile`` when ``compile``); see the module
    docstring. Both kinds start from the same models for a given ``seed``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown reference kind {kind!r}; expected one of {', '.join(KINDS)}")
    if os.cpu_count() and torch.get_num_threads() != os.cpu_count():
        torch.set_num_threads(os.cpu_count())  # Intra-op threads: every core.
    if kind == "a":
        return _reference_a(setup, seed)
    return _reference_b(setup, seed, compile)


def parameter_count(model: torch.nn.Module) -> int:
    """Trainable parameters, a tied head counted once."""
    return sum(p.numel() for p in model.parameters())


def setup_from_json(text: str) -> Setup:
    fields = json.loads(text)
    return Setup(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--serve", metavar="SETUP_JSON",
        help="serve steps to benchmarks/step.py (torch_reference.serve_steps); Setup fields",
    )  # fmt: skip
    parser.add_argument("--kinds", default="a,b", help="comma-separated: a, b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="kind b without torch.compile")
    args = parser.parse_args()
    kinds = tuple(args.kinds.split(","))
    if args.serve:
        setup = setup_from_json(args.serve)
        steps = {k: make_reference_step(k, setup, compile=not args.no_compile) for k in kinds}
        torch_reference.serve_steps(steps)
        return
    setup = Setup()
    tokens = setup.batch * setup.seq_len
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {setup}")
    for kind in kinds:
        start = time.perf_counter()
        step = make_reference_step(kind, setup, compile=not args.no_compile)
        seconds = torch_reference.time_reference(step, args.steps, args.warmup)
        total = time.perf_counter() - start
        print(
            f"({kind}) {seconds:.3f} s/step, {tokens / seconds:,.0f} tokens/s "
            f"(total with build and warm-up {total:.1f} s)"
        )


if __name__ == "__main__":
    main()
