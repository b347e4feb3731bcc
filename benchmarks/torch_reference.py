"""PyTorch reference training steps for the DWT train-step benchmark (issue 7).

    python benchmarks/torch_reference.py                 # both references, default shapes
    python benchmarks/torch_reference.py --kinds=b --no-compile --steps=3

Both references do one full distillation training step of a BERT masked-LM student
against a smaller BERT masked-LM teacher (run without gradients, eval mode), with the
loss of the JAX DWT step::

    L = CE(student, masked ids) + KL(p_teacher || p_student)

each term a mean over the masked (predicted) positions, KL at temperature 1 summed over
the vocabulary; then global-norm gradient clipping at 1.0 and AdamW (lr 1e-4, betas
0.9/0.999, eps 1e-6, weight decay 0.01 on every parameter except biases, LayerNorm and
embeddings — the JAX step's decay mask; the MLM decoder is tied to the word embeddings
so it takes no decay either). Student dropout 0.1 on hidden states and attention
probabilities (train mode); float32 throughout. The batch is fixed and random: token ids
in ``[5, vocab)``, one segment, no padding, ``predictions`` distinct sorted masked
positions per row (the JAX benchmark's batch schema).

(a) "as most users write it": ``BertForMaskedLM(input_ids, attention_mask,
    token_type_ids, labels=...)`` on all positions (logits ``[B, L, V]``) with labels
    -100 off the masked positions for the CE, the teacher the same under
    ``torch.no_grad()``, the KL on boolean-indexed rows of both logits;
    ``torch.optim.AdamW`` (default implementation), ``clip_grad_norm_``,
    ``zero_grad(set_to_none=True)``. Eager; the default HF attention (SDPA in
    transformers 5).

(b) "as a skilled engineer writes it": the same models (same initial parameters for a
    given seed), but ``model.bert(...)`` gives the sequence output, the masked positions
    are gathered first (``[B, M, D]``) and only they go through ``model.cls`` (the MLM
    head), for student and teacher alike: the vocabulary projection, by far the largest
    matmul at these shapes, shrinks by ``L / M`` (6.4× at the defaults). SDPA attention
    with no attention mask (the batch has no padding, so the mask is all ones and the
    math is unchanged). The loss function (student forward, teacher forward under
    ``torch.no_grad()``, CE and KL) is one ``torch.compile`` graph (no graph breaks);
    clipping is ``foreach`` and AdamW the ``fused`` kernel (it exists on CPU).

    Tried for (b) with the default models at batch 8 on the 2-core development machine
    (shared with other work, so figures are rough: minimum step times; eager (a) took
    0.86 s/step there), then at the default shapes (where (a) took 4.26 s/step). The
    gather before the head is worth far more than the rest together; after it the step
    is mostly float32 GEMMs (in torch.profiler, the Linear layers' addmm/mm with their
    bias copies and the attention bmm take ~55 % of the eager CPU time, elementwise ops
    the rest):
      * eager (b) (fused AdamW): 0.29-0.30 s/step.
      * update alone (clip + AdamW of the 11.2 M student parameters): default for-loop
        AdamW ~106 ms, ``foreach`` ~24 ms, ``fused`` ~14 ms, ``torch.compile`` of clip +
        step ~20 ms (after 30 s of compiling). Kept ``fused``, eager.
      * ``torch.compile`` of the loss function: at batch 8 within noise of eager
        (0.29 s/step), but at the default shapes 1.11 s/step against 1.39 eager (one run
        each): inductor fuses the LayerNorm/GELU/dropout/softmax/loss elementwise work
        around the GEMMs. Kept. Compiling takes ~30-40 s on two cores.
      * teacher under ``torch.inference_mode()`` in its own compiled graph instead of
        ``torch.no_grad()`` inside the student's: same time; kept the single graph.
      * passing the all-ones attention mask or not: same time (HF drops an all-ones
        mask for SDPA); it is left out. With dropout on the attention probabilities
        SDPA runs its math path for the student anyway (the CPU flash kernel is for the
        dropout-free teacher).
      * not tried: lower matmul precision (``torch.set_float32_matmul_precision``) or
        bf16 autocast, which would change the math (the comparison is float32 against
        float32), and ``mode="max-autotune-no-cudagraphs"`` (long autotuning on two
        cores, against the oneDNN/MKL GEMMs that dominate the step).

``torch.compile`` needs a C++ compiler and the Python headers (inductor's CPU backend);
without them use ``compile=False``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import transformers
from torch.nn import functional

LEARNING_RATE = 1e-4
BETAS = (0.9, 0.999)
EPS = 1e-6
WEIGHT_DECAY = 0.01
CLIP_NORM = 1.0
MAX_POSITIONS = 512
KINDS = ("a", "b")
PEAK_RSS = "peak_rss"  # The request for the serving process's peak RSS.


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Model sizes (layers, hidden, heads, MLP) and batch shape of the benchmark."""

    student: tuple[int, int, int, int] = (4, 256, 4, 1024)
    teacher: tuple[int, int, int, int] = (2, 128, 2, 512)
    vocab: int = 30522
    batch: int = 32
    seq_len: int = 128
    predictions: int = 20
    dropout: float = 0.1


def bert_config(
    sizes: tuple[int, int, int, int], shapes: Shapes, dropout: float, attn: str | None
) -> transformers.BertConfig:
    """An HF BERT config of ``sizes`` = (layers, hidden, heads, mlp); ``attn`` is the
    attention implementation (None: the transformers default)."""
    layers, hidden, heads, mlp = sizes
    config = transformers.BertConfig(
        vocab_size=shapes.vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        max_position_embeddings=MAX_POSITIONS,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    if attn is not None:
        config._attn_implementation = attn
    return config


def make_batch(shapes: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """The fixed random batch: ``input_ids``, ``token_type_ids``, ``attention_mask``
    ``[B, L]``; ``masked_positions`` (distinct, sorted) and ``masked_ids`` ``[B, M]``;
    ``labels`` ``[B, L]`` (the masked ids at the masked positions, -100 elsewhere)."""
    rng = np.random.default_rng(seed)
    rows, length, m = shapes.batch, shapes.seq_len, shapes.predictions
    input_ids = rng.integers(5, shapes.vocab, (rows, length))
    positions = np.sort(np.stack([rng.choice(length, m, replace=False) for _ in range(rows)]))
    masked_ids = rng.integers(5, shapes.vocab, (rows, m))
    labels = np.full((rows, length), -100)
    np.put_along_axis(labels, positions, masked_ids, axis=1)
    batch = {
        "input_ids": input_ids,
        "token_type_ids": np.zeros((rows, length)),
        "attention_mask": np.ones((rows, length)),
        "masked_positions": positions,
        "masked_ids": masked_ids,
        "labels": labels,
    }
    return {name: torch.as_tensor(value, dtype=torch.long) for name, value in batch.items()}


def make_models(
    shapes: Shapes, seed: int, attn: str | None = None
) -> tuple[transformers.BertForMaskedLM, transformers.BertForMaskedLM]:
    """(student in train mode, teacher in eval mode without gradients), seeded: the
    parameters depend on ``shapes`` and ``seed`` only, not on ``attn``."""
    torch.manual_seed(seed)
    student = transformers.BertForMaskedLM(
        bert_config(shapes.student, shapes, shapes.dropout, attn)
    )
    teacher = transformers.BertForMaskedLM(bert_config(shapes.teacher, shapes, 0.0, attn))
    student.train()
    teacher.eval().requires_grad_(False)
    return student, teacher


def parameter_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW groups: weight decay except on biases, LayerNorm and embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # Tied parameters are listed once.
        skip = name.endswith("bias") or "LayerNorm" in name or "embeddings" in name
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) summed over the vocabulary, mean over rows ``[N, V]``."""
    return functional.kl_div(
        functional.log_softmax(student_logits, -1),
        functional.log_softmax(teacher_logits, -1),
        reduction="batchmean",
        log_target=True,
    )


class ReferenceStep:
    """One full training step per call (returns the loss as a float).

    ``student``, ``teacher``, ``optimizer`` and ``batch`` are exposed for tests. The
    step draws its dropout masks from its own RNG stream (seeded at construction), so
    steps are reproducible whatever else uses torch's global generator in between.
    """

    def __init__(
        self,
        loss_fn: Callable[[], torch.Tensor],
        update_fn: Callable[[], None],
        student: transformers.BertForMaskedLM,
        teacher: transformers.BertForMaskedLM,
        optimizer: torch.optim.Optimizer,
        batch: dict[str, torch.Tensor],
        seed: int,
    ) -> None:
        self.loss_fn, self.update_fn = loss_fn, update_fn
        self.student, self.teacher, self.optimizer, self.batch = student, teacher, optimizer, batch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self._rng_state = torch.get_rng_state()

    def __call__(self) -> float:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn()
            loss.backward()
            self.update_fn()
            self._rng_state = torch.get_rng_state()
        return loss.item()


def _reference_a(shapes: Shapes, seed: int) -> ReferenceStep:
    student, teacher = make_models(shapes, seed)
    batch = make_batch(shapes, seed)
    optimizer = torch.optim.AdamW(parameter_groups(student), LEARNING_RATE, BETAS, EPS)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = batch["labels"]
    selected = labels != -100

    def loss_fn() -> torch.Tensor:
        out = student(**inputs, labels=labels)
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        return out.loss + kl_teacher_student(out.logits[selected], teacher_logits[selected])

    def update_fn() -> None:
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP_NORM)
        optimizer.step()

    return ReferenceStep(loss_fn, update_fn, student, teacher, optimizer, batch, seed)


def masked_logits(
    model: transformers.BertForMaskedLM, input_ids: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """MLM logits ``[B, M, V]`` at ``positions`` only: encoder, gather, then the head."""
    hidden = model.bert(input_ids=input_ids).last_hidden_state  # [B, L, D]
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return model.cls(torch.gather(hidden, 1, index))


def _reference_b(shapes: Shapes, seed: int, compile: bool) -> ReferenceStep:
    student, teacher = make_models(shapes, seed, attn="sdpa")
    batch = make_batch(shapes, seed)
    params = list(student.parameters())
    optimizer = torch.optim.AdamW(parameter_groups(student), LEARNING_RATE, BETAS, EPS, fused=True)
    # token_type_ids default to the model's zero buffer, and with no padding the
    # attention mask is all ones (HF would drop it for SDPA): leaving both out keeps the
    # math.
    input_ids, positions = batch["input_ids"], batch["masked_positions"]
    targets = batch["masked_ids"].reshape(-1)

    def loss_fn() -> torch.Tensor:
        logits = masked_logits(student, input_ids, positions).flatten(0, 1)  # [B·M, V]
        with torch.no_grad():
            teacher_logits = masked_logits(teacher, input_ids, positions).flatten(0, 1)
        ce = functional.cross_entropy(logits, targets)
        return ce + kl_teacher_student(logits, teacher_logits)

    def update_fn() -> None:
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM, foreach=True)
        optimizer.step()

    if compile:
        loss_fn = torch.compile(loss_fn)
    return ReferenceStep(loss_fn, update_fn, student, teacher, optimizer, batch, seed)


def make_reference_step(
    kind: str, shapes: Shapes, *, seed: int = 0, compile: bool = True
) -> ReferenceStep:
    """A zero-argument function doing one full training step on a fixed random batch
    (built once, seeded) and returning the loss as a Python float.

    ``kind`` is ``"a"`` (eager HF on all positions) or ``"b"`` (gather before the MLM
    head, SDPA, ``torch.compile`` when ``compile``); see the module docstring. The
    student and teacher parameters depend only on ``seed`` and ``shapes``, so both
    kinds start from the same models. ``compile`` only affects kind ``"b"``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown reference kind {kind!r}; expected one of {', '.join(KINDS)}")
    if os.cpu_count() and torch.get_num_threads() != os.cpu_count():
        torch.set_num_threads(os.cpu_count())  # Intra-op threads: every core.
    if kind == "a":
        return _reference_a(shapes, seed)
    return _reference_b(shapes, seed, compile)


def time_reference(step: Callable[[], float], steps: int = 10, warmup: int = 2) -> float:
    """Median seconds per step over ``steps`` timed steps after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM, the high-water mark of its own
    address space (``ru_maxrss`` would also count the parent it was forked from, which
    Linux carries across ``execve``), or ``ru_maxrss`` where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return 1024 * int(line.split()[1])
    except OSError:
        pass
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def serve_steps(steps: dict[str, Callable[[], float]]) -> None:
    """Steps on request, for a benchmark in another process (``benchmarks/step.py``).

    Prints ``ready``, then for every line ``KIND`` read from stdin runs one step of
    ``steps[KIND]`` and prints its seconds, until stdin closes; the line ``peak_rss``
    prints this process's peak resident set size in bytes (:func:`peak_rss_bytes`:
    everything it has held so far, compiling included). The other process stays idle
    while a step runs here, and neither framework's threads or heap disturb the other's
    timing.
    """
    print("ready", flush=True)
    for line in sys.stdin:
        kind = line.strip()
        if kind == PEAK_RSS:
            print(peak_rss_bytes(), flush=True)
            continue
        if kind not in steps:
            print(f"error unknown kind {kind!r}", flush=True)
            continue
        start = time.perf_counter()
        steps[kind]()
        print(f"{time.perf_counter() - start:.9f}", flush=True)


def serve(shapes: Shapes, kinds: tuple[str, ...], compile: bool) -> None:
    """Serves the references of ``kinds`` (see :func:`serve_steps`)."""
    serve_steps({kind: make_reference_step(kind, shapes, compile=compile) for kind in kinds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--serve", metavar="SHAPES_JSON",
        help="serve steps to benchmarks/step.py (see serve()); SHAPES_JSON: Shapes fields",
    )  # fmt: skip
    parser.add_argument("--kinds", default="a,b", help="comma-separated: a, b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="kind b without torch.compile")
    args = parser.parse_args()
    if args.serve:
        fields = json.loads(args.serve)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        serve(Shapes(**fields), tuple(args.kinds.split(",")), compile=not args.no_compile)
        return
    shapes = Shapes()
    tokens = shapes.batch * shapes.seq_len
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {shapes}")
    for kind in args.kinds.split(","):
        start = time.perf_counter()
        step = make_reference_step(kind, shapes, compile=not args.no_compile)
        seconds = time_reference(step, args.steps, args.warmup)
        total = time.perf_counter() - start
        print(
            f"({kind}) {seconds:.3f} s/step, {tokens / seconds:,.0f} tokens/s "
            f"(total with build and warm-up {total:.1f} s)"
        )


if __name__ == "__main__":
    main()
