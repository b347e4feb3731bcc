"""`remap_params`: a trained teacher's parameters grown into a larger student's tree.

Decoder configs (GPT-2, Llama families) go to `decoder.py`. For BERT the steps, each
a pure function of its own module: check the two configs; widen
every teacher tensor to the student's sizes (`width.py`, teacher depth); rebuild the
encoder layers by a layer map (`depth.py`); strictly merge with the student template
(`merge.py`). Host-side numpy throughout; the result holds numpy arrays (place or
shard them with `jax.device_put`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dwt_jax.models.bert import make_model
from dwt_jax.models.config import BertConfig
from dwt_jax.models.decoder_config import DecoderConfig
from dwt_jax.remap import decoder as decoder_lib
from dwt_jax.remap import depth as depth_lib
from dwt_jax.remap import merge
from dwt_jax.remap import width as width_lib
from dwt_jax.remap.report import RemapReport
from dwt_jax.remap.rules import Path

# 'hypercloning': FPI with cyclic new units, refused unless the hidden size is a multiple
# of the teacher's, so that it is exact (docs/methods.md#decoder-growth).
WIDTH_METHODS = (*width_lib.WIDTH_METHODS, decoder_lib.HYPERCLONING)
ModelConfig = BertConfig | DecoderConfig

_HEAD_OF_MODEL = {"cls": "mlm", "classifier": "classifier"}
_POSITIONS = ("bert", "embeddings", "position_embeddings", "embedding")
_NOISE_STREAM = 7

log = logging.getLogger(__name__)


def _check_configs(teacher_cfg: BertConfig, student_cfg: BertConfig) -> None:
    """ValueError naming the field (or the path) that cannot be remapped."""
    if teacher_cfg.norm != student_cfg.norm:
        raise ValueError(
            f"teacher model.norm={teacher_cfg.norm!r} but student model.norm="
            f"{student_cfg.norm!r}: remapping needs the same norm placement."
        )
    t, s = teacher_cfg, student_cfg
    if t.position_offset != s.position_offset:
        raise ValueError(
            f"teacher model.position_offset={t.position_offset} but the student's is "
            f"{s.position_offset}: the position table rows mean other positions; set the "
            f"student's model.position_offset={t.position_offset}."
        )
    for name, size in (
        ("word_embeddings", "vocab_size"),
        ("token_type_embeddings", "type_vocab_size"),
    ):
        if getattr(t, size) != getattr(s, size):
            raise ValueError(
                f"bert/embeddings/{name}/embedding: teacher shape ({getattr(t, size)}, "
                f"{t.hidden_size}) vs student shape ({getattr(s, size)}, {s.hidden_size}): "
                f"remapping cannot change this table; set the student's model.{size}="
                f"{getattr(t, size)} (the teacher's tokenizer / segment ids)."
            )
    for field in ("hidden_size", "num_heads", "head_dim", "mlp_dim", "num_layers", "max_len"):
        if getattr(s, field) < getattr(t, field):
            label = "head_dim (hidden_size/num_heads)" if field == "head_dim" else field
            raise ValueError(
                f"student model.{label}={getattr(s, field)} is smaller than the teacher's "
                f"{getattr(t, field)}: remapping only grows a model; make the student at "
                "least as large on every axis."
            )


def _student_template(student_cfg: BertConfig, head: str) -> dict[str, Any]:
    """The student's parameter shapes (`jax.ShapeDtypeStruct`s), by abstract init."""
    model = make_model(student_cfg, head)
    ids = jnp.zeros((1, 2), jnp.int32)
    variables = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            input_ids=ids,
            segment_ids=ids + 1,
            positions=ids,
            token_type_ids=ids,
            masked_positions=ids[:, :1],
            deterministic=True,
        )
    )
    return nn.meta.unbox(variables["params"])


def _fill_fn(
    seed: int, noise_std: float, template: Mapping[Path, Any], teacher_max_len: int
) -> width_lib.FillFn:
    """`(path, shape) -> array`: N(0, noise_std) per path (seeded by `seed` and the
    path); new position rows from the template when it holds values."""

    def fill(path: Path, shape: tuple[int, ...]) -> np.ndarray:
        values = np.zeros(shape, np.float32)
        if noise_std > 0:
            rng = np.random.default_rng([seed, _NOISE_STREAM, zlib.crc32("/".join(path).encode())])
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_std)
        leaf = template.get(path)
        if path == _POSITIONS and leaf is not None and hasattr(leaf, "__array__"):
            values[teacher_max_len:] = np.asarray(leaf, np.float32)[teacher_max_len:]
        return values

    return fill


def _split_heads(
    flat_teacher: dict[Path, Any], template: Mapping[Path, Any], drop_teacher_heads: bool
) -> tuple[dict[Path, Any], tuple[str, ...], frozenset[str]]:
    """(teacher without dropped heads, dropped paths, student heads the teacher lacks)."""
    teacher_tops = {path[0] for path in flat_teacher}
    student_tops = {path[0] for path in template}
    dropped = tuple("/".join(p) for p in flat_teacher if p[0] not in student_tops)
    if dropped and not drop_teacher_heads:
        raise ValueError(
            f"{dropped[0]}: the teacher has this head but the student does not (student heads: "
            f"{sorted(student_tops - {'bert'})}): pass drop_teacher_heads=True to leave it out."
        )
    kept = {p: v for p, v in flat_teacher.items() if p[0] in student_tops}
    return kept, dropped, frozenset(student_tops - teacher_tops)


def remap_params_with_report(
    teacher_params: Mapping[str, Any],
    teacher_cfg: ModelConfig,
    student_cfg: ModelConfig,
    *,
    depth: str = "fna",
    width: str = "fpi",
    seed: int = 0,
    noise_std: float = 0.0,
    student_template: Mapping[str, Any] | None = None,
    new_units: str = "random",
    drop_teacher_heads: bool = False,
) -> tuple[dict[str, Any], RemapReport]:
    """`remap_params`, also returning a `RemapReport`."""
    if noise_std < 0:
        raise ValueError(f"noise_std={noise_std}: must be >= 0.")
    if seed < 0:
        raise ValueError(f"seed={seed}: must be a non-negative integer.")
    if set(teacher_params) == {"params"}:
        raise ValueError(
            "teacher_params holds a 'params' collection: pass variables['params'], not the "
            "whole variables dict."
        )
    if teacher_cfg.family != student_cfg.family:
        raise ValueError(
            f"teacher model.family={teacher_cfg.family!r} but student model.family="
            f"{student_cfg.family!r}: remapping grows a model within its family; set the "
            f"student's model.family={teacher_cfg.family!r}."
        )
    if isinstance(teacher_cfg, DecoderConfig):
        return decoder_lib.remap_decoder_with_report(
            teacher_params,
            teacher_cfg,
            student_cfg,
            depth=depth,
            width=width,
            seed=seed,
            noise_std=noise_std,
            student_template=student_template,
            new_units=new_units,
        )
    _check_configs(teacher_cfg, student_cfg)
    plan = depth_lib.depth_plan(
        depth, teacher_cfg.num_layers, student_cfg.num_layers, student_cfg.norm
    )
    if width not in WIDTH_METHODS:
        raise ValueError(f"width={width!r} is unknown: use one of {WIDTH_METHODS}.")
    if width == decoder_lib.HYPERCLONING:
        if student_cfg.hidden_size % teacher_cfg.hidden_size:
            raise ValueError(
                f"student model.hidden_size={student_cfg.hidden_size} is not a multiple of "
                f"the teacher's {teacher_cfg.hidden_size}: width='hypercloning' copies every "
                "hidden unit equally often so that LayerNorm statistics are unchanged; use a "
                "multiple or width='fpi' (approximate)."
            )
        width, new_units = "fpi", "cyclic"
    flat_teacher = merge.flatten(nn.meta.unbox(dict(teacher_params)))
    if student_template is None:
        heads = sorted({p[0] for p in flat_teacher} & set(_HEAD_OF_MODEL))
        if len(heads) != 1:
            raise ValueError(
                f"the teacher tree has heads {heads}: pass student_template= to say which "
                "head the student has."
            )
        student_template = _student_template(student_cfg, _HEAD_OF_MODEL[heads[0]])
    template = merge.flatten(nn.meta.unbox(dict(student_template)))
    flat_teacher, dropped, template_heads = _split_heads(flat_teacher, template, drop_teacher_heads)
    maps = None
    if width != "noise":
        maps = width_lib.make_unit_maps(teacher_cfg, student_cfg, seed=seed, new_units=new_units)
    filled: list[str] = []
    new_entries = _fill_fn(seed, noise_std, template, teacher_cfg.max_len)

    def fill(path: Path, shape: tuple[int, ...]) -> np.ndarray:
        filled.append("/".join(path))
        return new_entries(path, shape)

    widened = width_lib.widen_params(
        flat_teacher, teacher_cfg, student_cfg, method=width, maps=maps, fill_fn=fill
    )
    student, from_template = merge.strict_merge(
        depth_lib.deepen(widened, plan), template, template_heads=template_heads
    )
    report = RemapReport(plan.sources, plan.identity, from_template, dropped, tuple(filled))
    return student, report


def remap_params(
    teacher_params: Mapping[str, Any],
    teacher_cfg: ModelConfig,
    student_cfg: ModelConfig,
    *,
    depth: str = "fna",
    width: str = "fpi",
    seed: int = 0,
    noise_std: float = 0.0,
    student_template: Mapping[str, Any] | None = None,
    new_units: str = "random",
    drop_teacher_heads: bool = False,
) -> dict[str, Any]:
    """The teacher's parameters grown into the student's tree (numpy arrays).

    Args:
      teacher_params: the teacher's `params` tree (plain or boxed nested dicts).
      teacher_cfg: the teacher's architecture (`BertConfig`, or a `DecoderConfig`: then
        `decoder.py` grows it); every teacher shape is checked against it.
      student_cfg: the student's, of the teacher's family; at least as large as the
        teacher's on every axis, with the same vocabulary, type vocabulary and `norm`
        (decoders: see `decoder.check_decoder_configs`).
      depth: 'fna', 'stack', 'interleave' or 'identity' (pre-LN only); see `depth.py`.
      width: 'fpi', 'aki', 'noise' (see `width.py`) or 'hypercloning' (HyperCloning: 'fpi'
        with cyclic new units, refused unless the hidden size is a multiple of the
        teacher's; exact, see `decoder.py`).
      seed: draws the new units of the unit maps and the noise.
      noise_std: standard deviation of the noise filling entries no teacher entry
        maps to ('noise' width; new position rows without a template).
      student_template: the student's tree (e.g. a fresh init): the exact structure,
        shapes and dtypes to produce; it also supplies heads the teacher lacks and
        position rows beyond the teacher's `max_len`. Without it the structure comes
        from an abstract init of `student_cfg` with the teacher's head.
      new_units: 'random' (default) or 'cyclic' (`j mod old`: with a width that is a
        multiple of the teacher's, FPI is then exact, LayerNorms included).
      drop_teacher_heads: leave out teacher heads the student lacks (else an error);
        decoders have no optional heads and ignore it.

    Returns:
      The student `params` tree, exactly the template's structure, shapes and dtypes.

    Raises:
      ValueError: one line naming the path or config field that cannot be remapped.
    """
    student, report = remap_params_with_report(
        teacher_params,
        teacher_cfg,
        student_cfg,
        depth=depth,
        width=width,
        seed=seed,
        noise_std=noise_std,
        student_template=student_template,
        new_units=new_units,
        drop_teacher_heads=drop_teacher_heads,
    )
    log.info(
        "remap depth=%s width=%s: layer map %s, identity layers %s, %d paths from the "
        "template, %d teacher paths dropped, %d paths filled",
        depth,
        width,
        report.layer_map,
        report.identity_layers,
        len(report.from_template),
        len(report.dropped),
        len(report.filled),
    )
    return student
