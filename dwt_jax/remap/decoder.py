"""Growth of a decoder (GPT-2 or Llama family) into a larger one of the same family.

`remap.remap_params` dispatches here when both configs are `DecoderConfig`s. The steps
are those of the BERT remap: check the configs; widen every teacher tensor to the
student's sizes by the table in `decoder_rules.py` (teacher depth); rebuild the blocks
by a layer map (`depth.layer_map`); strictly merge with the student template.

Width methods (docs/methods.md#decoder-growth):

- `hypercloning` (HyperCloning; exact): every unit is copied by the cyclic map `j mod old`,
  and the hidden size must be a multiple of the teacher's, so every hidden unit is
  copied equally often (n = D_s / D_t times) and LayerNorm/RMSNorm statistics are
  unchanged. Heads are copied as whole heads (head_dim unchanged, which keeps RoPE
  exact), key/value heads with them (the query heads per key/value head unchanged);
  the output projection's rows of a copied head, and the down-projection rows of a
  copied MLP unit, are divided by its copy count (head and MLP counts need not be
  integer factors: each copy count divides its own rows). The tied head: the final
  norm's scale (and GPT-2's bias) is divided by n, so the final hidden state is
  `repeat(h)/n` and `repeat(h)/n · repeat(E)ᵀ = h·Eᵀ`; an untied `lm_head` is divided
  by n instead (final hidden `repeat(h)`).
- `fpi` (Net2Net): as `hypercloning` with new units drawn at random (`seed`) unless
  `new_units='cyclic'`, any sizes; approximate when the hidden map copies units
  unequally (norm statistics change), exact at an unchanged hidden size.
- `aki` (bert2BERT): `fpi`, with the new units of block l taken from block l + 1
  (norms follow `fpi`).
- `noise` (FNA's width rule): the teacher fills the leading corner, everything else is
  N(0, noise_std); any sizes, approximate.

Depth methods are `depth.py`'s: `identity` (exact; decoders are pre-norm) appends the
new blocks after the copied ones, each a copy of the teacher's last block with its
attention-output and MLP-output projections (kernels and GPT-2's biases) zeroed;
`fna`, `stack` (G_stack) and `interleave` are approximate.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dwt_jax.models.decoder_config import DecoderConfig
from dwt_jax.models.families import make_lm
from dwt_jax.remap import decoder_rules as drules
from dwt_jax.remap import depth as depth_lib
from dwt_jax.remap import merge
from dwt_jax.remap import width as width_lib
from dwt_jax.remap.report import RemapReport
from dwt_jax.remap.rules import HIDDEN, MLP, Axis, Path

HYPERCLONING = "hypercloning"
DECODER_WIDTH_METHODS = (HYPERCLONING, "fpi", "aki", "noise")
_STREAMS = {HIDDEN: 0, drules.KV_HEADS: 1, MLP: 3}
_NOISE_STREAM = 7
_GROWN_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "max_len",
)
_SAME_FIELDS = ("vocab_size", "qkv_bias", "qk_norm", "norm_eps")
_ROPE_FIELDS = ("rope_theta", "rope_scaling")
_LLAMA3_FIELDS = (
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
)


@dataclasses.dataclass(frozen=True)
class DecoderUnitMaps:
    """The unit maps of one decoder remap: one hidden map; per teacher block, the
    key/value-head map, the query-head map derived from it, and the MLP map."""

    hidden: np.ndarray
    heads: tuple[np.ndarray, ...]
    kv_heads: tuple[np.ndarray, ...]
    mlp: tuple[np.ndarray, ...]

    def get(self, kind: str, layer: int | None) -> np.ndarray:
        """The map of `kind` (a `decoder_rules.UNIT_KINDS` entry) in teacher block `layer`."""
        if kind == HIDDEN:
            return self.hidden
        if layer is None:
            raise ValueError(f"the {kind} map is per block: pass the block index.")
        return getattr(self, kind)[layer]


def _group_size_fix(teacher_cfg: DecoderConfig, student_cfg: DecoderConfig) -> str | None:
    """Why the student's query heads per key/value head differ from the teacher's (or None)."""
    group = teacher_cfg.num_heads // teacher_cfg.num_kv_heads
    if student_cfg.num_heads == student_cfg.num_kv_heads * group:
        return None
    fix = f"set model.num_kv_heads={student_cfg.num_heads // group}"
    if student_cfg.num_heads % group:
        fix = f"use a model.num_heads that is a multiple of {group} and num_heads/{group} KV heads"
    return (
        f"student model.num_kv_heads={student_cfg.num_kv_heads} gives "
        f"{student_cfg.num_heads // student_cfg.num_kv_heads} query heads per key/value head "
        f"but the teacher has {group}: a copied query head must read a copy of its own "
        f"key/value head; {fix} (or use width='noise')."
    )


def decoder_unit_maps(
    teacher_cfg: DecoderConfig,
    student_cfg: DecoderConfig,
    *,
    seed: int = 0,
    new_units: str = "random",
) -> DecoderUnitMaps:
    """Unit maps from the teacher's to the student's sizes (`width.unit_map`: the
    identity, then old units at random or cyclically). Query heads follow their
    key/value head: new head `g'·r + i` copies old head `g_kv(g')·r + i` (r query heads
    per key/value head, unchanged), so GQA groups stay consistent."""
    if new_units not in width_lib.NEW_UNITS:
        raise ValueError(f"new_units={new_units!r} is unknown: use one of {width_lib.NEW_UNITS}.")
    if seed < 0:
        raise ValueError(f"seed={seed}: must be a non-negative integer.")
    problem = _group_size_fix(teacher_cfg, student_cfg)
    if problem:
        raise ValueError(problem)
    group = teacher_cfg.num_heads // teacher_cfg.num_kv_heads

    def make(kind: str, layer: int, old: int, new: int) -> np.ndarray:
        rng = None
        if new_units == "random":
            rng = np.random.default_rng([seed, _STREAMS[kind], layer])
        return width_lib.unit_map(old, new, rng)

    layers = range(teacher_cfg.num_layers)
    t, s = teacher_cfg, student_cfg
    kv = tuple(make(drules.KV_HEADS, i, t.num_kv_heads, s.num_kv_heads) for i in layers)
    return DecoderUnitMaps(
        hidden=make(HIDDEN, 0, t.hidden_size, s.hidden_size),
        heads=tuple((g[:, None] * group + np.arange(group)).reshape(-1) for g in kv),
        kv_heads=kv,
        mlp=tuple(make(MLP, i, t.mlp_dim, s.mlp_dim) for i in layers),
    )


def check_decoder_configs(
    teacher_cfg: DecoderConfig, student_cfg: DecoderConfig, width: str
) -> None:
    """ValueError naming the first config field that `width` cannot grow across."""
    t, s = teacher_cfg, student_cfg
    if width not in DECODER_WIDTH_METHODS:
        raise ValueError(f"width={width!r} is unknown: use one of {DECODER_WIDTH_METHODS}.")
    if t.family != s.family:
        raise ValueError(
            f"teacher model.family={t.family!r} but student model.family={s.family!r}: "
            "remapping grows a model within its family; set the student's model.family="
            f"{t.family!r}."
        )
    same = _SAME_FIELDS + (_ROPE_FIELDS if t.family == "llama" else ())
    same += _LLAMA3_FIELDS if t.rope_scaling == "llama3" and t.family == "llama" else ()
    for field in same:
        if getattr(t, field) != getattr(s, field):
            raise ValueError(
                f"teacher model.{field}={getattr(t, field)!r} but the student's is "
                f"{getattr(s, field)!r}: the grown model must compute what the teacher does "
                f"(same vocabulary, parameters and positions); set the student's model.{field}="
                f"{getattr(t, field)!r}."
            )
    if s.tied and not t.tied:
        raise ValueError(
            "teacher model.tie_embeddings=False but the student's is True: an untied LM head "
            "and the embedding table cannot become one table; set the student's "
            "model.tie_embeddings=False."
        )
    for field in _GROWN_FIELDS:
        if getattr(s, field) < getattr(t, field):
            raise ValueError(
                f"student model.{field}={getattr(s, field)} is smaller than the teacher's "
                f"{getattr(t, field)}: remapping only grows a model; make the student at "
                "least as large on every axis."
            )
    if width == "noise":
        return
    if s.head_dim != t.head_dim:
        heads = t.num_heads * s.hidden_size // t.hidden_size
        hint = f" (GPT-2: model.num_heads={heads})" if t.family == "gpt2" else ""
        raise ValueError(
            f"student model.head_dim={s.head_dim} but the teacher's is {t.head_dim}: "
            f"width={width!r} copies whole heads and keeps their width (RoPE rotates the "
            f"halves of a head); grow num_heads instead{hint}, or use width='noise'."
        )
    problem = _group_size_fix(t, s)
    if problem:
        raise ValueError(problem)
    if width == HYPERCLONING and s.hidden_size % t.hidden_size:
        raise ValueError(
            f"student model.hidden_size={s.hidden_size} is not a multiple of the teacher's "
            f"{t.hidden_size}: width='hypercloning' copies every hidden unit equally often so that "
            f"norm statistics are unchanged; use a multiple (e.g. {2 * t.hidden_size}) or "
            "width='fpi' (approximate)."
        )


def _target_shape(
    path: Path, x: np.ndarray, axes: tuple[Axis, ...], old: Mapping, new: Mapping
) -> tuple[int, ...]:
    """The student shape of `path`, after checking `x` against the teacher's sizes."""
    expected = tuple(old[a.kind] for a in axes)
    if x.shape != expected:
        raise ValueError(
            f"{'/'.join(path)}: teacher shape {x.shape} does not match teacher_cfg (expects "
            f"{expected}): pass the config the teacher was trained with."
        )
    return tuple(new[a.kind] for a in axes)


def widen_decoder(
    flat_teacher: Mapping[Path, np.ndarray],
    teacher_cfg: DecoderConfig,
    student_cfg: DecoderConfig,
    *,
    method: str,
    maps: DecoderUnitMaps | None,
    fill_fn: width_lib.FillFn,
) -> dict[Path, np.ndarray]:
    """Every teacher parameter widened to the student's sizes (the teacher's depth).

    Args:
      flat_teacher: `{path: array}` of the teacher tree (`merge.flatten`).
      teacher_cfg, student_cfg: the two architectures (checked by `check_decoder_configs`).
      method: 'fpi' (also `hypercloning`'s, with cyclic maps), 'aki' or 'noise'.
      maps: the unit maps (`decoder_unit_maps`); None for 'noise'.
      fill_fn: `(path, shape) -> array` for entries no teacher entry maps to.
    """
    if method not in ("fpi", "aki", "noise"):
        raise ValueError(f"widen_decoder(method={method!r}): use 'fpi', 'aki' or 'noise'.")
    if (method == "noise") != (maps is None):
        raise ValueError(
            f"widen_decoder(method={method!r}): pass unit maps (decoder_unit_maps) for 'fpi' "
            "and 'aki', none for 'noise'."
        )
    old, new = drules.sizes(teacher_cfg), drules.sizes(student_cfg)
    last = teacher_cfg.num_layers - 1
    out: dict[Path, np.ndarray] = {}
    for path, value in flat_teacher.items():
        axes = drules.axes_of(path, student_cfg.tied)
        layer = drules.layer_index(path)
        if layer is not None and layer > last:
            raise ValueError(
                f"{'/'.join(path)}: teacher block {layer} but teacher_cfg.num_layers="
                f"{teacher_cfg.num_layers}: pass the config the teacher was trained with."
            )
        x = np.asarray(value)
        target = _target_shape(path, x, axes, old, new)
        tensor_maps = [
            maps.get(a.kind, layer) if maps is not None and a.kind in drules.UNIT_KINDS else None
            for a in axes
        ]
        grows_in_corner = any(
            g is None and t > s for g, t, s in zip(tensor_maps, target, x.shape, strict=True)
        )
        widen = functools.partial(
            width_lib.widen_tensor,
            axes=axes,
            maps=tensor_maps,
            target_shape=target,
            fill=fill_fn(path, target) if grows_in_corner else None,
        )
        y = widen(x)
        if method == "aki" and layer is not None and not set(path) & set(drules.BLOCK_NORMS):
            next_path = drules.with_layer(path, min(layer + 1, last))
            if next_path not in flat_teacher:
                raise ValueError(
                    f"{'/'.join(next_path)}: AKI widens block {layer} from this parameter, "
                    "which the teacher tree lacks."
                )
            y_next = widen(np.asarray(flat_teacher[next_path]))
            y = np.where(width_lib.new_unit_mask(axes, x.shape, target), y_next, y)
        out[path] = y
    return out


def deepen_decoder(
    flat: Mapping[Path, np.ndarray], plan: depth_lib.DepthPlan
) -> dict[Path, np.ndarray]:
    """The blocks of `flat` rebuilt by `plan` (each student block its own copy of its
    source block; identity blocks with zero output projections); other paths pass."""
    return depth_lib.deepen(flat, plan, layout=drules, unit="block {}")


def decoder_template(cfg: DecoderConfig) -> dict[str, Any]:
    """The decoder's parameter shapes (`jax.ShapeDtypeStruct`s), by abstract init."""
    ids = jnp.zeros((1, 2), jnp.int32)
    variables = jax.eval_shape(
        lambda: make_lm(cfg).init(
            jax.random.key(0), input_ids=ids, segment_ids=ids + 1, positions=ids, deterministic=True
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
        if path == drules.POSITIONS and leaf is not None and hasattr(leaf, "__array__"):
            values[teacher_max_len:] = np.asarray(leaf, np.float32)[teacher_max_len:]
        return values

    return fill


def remap_decoder_with_report(
    teacher_params: Mapping[str, Any],
    teacher_cfg: DecoderConfig,
    student_cfg: DecoderConfig,
    *,
    depth: str = "fna",
    width: str = HYPERCLONING,
    seed: int = 0,
    noise_std: float = 0.0,
    student_template: Mapping[str, Any] | None = None,
    new_units: str = "random",
) -> tuple[dict[str, Any], RemapReport]:
    """The decoder teacher's parameters grown into the student's tree, and a report.

    `remap.remap_params` documents the arguments; `width='hypercloning'` ignores `new_units`
    (its maps are cyclic). A tied teacher may grow into an untied student (the head
    starts as the embedding table), not the reverse. New blocks of `depth='identity'`
    come after the copied ones and copy the teacher's last block, output projections
    zeroed.
    """
    check_decoder_configs(teacher_cfg, student_cfg, width)
    plan = depth_lib.depth_plan(depth, teacher_cfg.num_layers, student_cfg.num_layers, "pre")
    flat_teacher = merge.flatten(nn.meta.unbox(dict(teacher_params)))
    embeddings = drules.EMBEDDINGS[teacher_cfg.family]
    if teacher_cfg.tied and not student_cfg.tied and embeddings in flat_teacher:
        # The tied head reads the table as [V, D]; lm_head's kernel is [D, V].
        flat_teacher[drules.LM_HEAD] = np.asarray(flat_teacher[embeddings]).T
    if student_template is None:
        student_template = decoder_template(student_cfg)
    template = merge.flatten(nn.meta.unbox(dict(student_template)))
    maps = None
    if width != "noise":
        units = "cyclic" if width == HYPERCLONING else new_units
        maps = decoder_unit_maps(teacher_cfg, student_cfg, seed=seed, new_units=units)
    filled: list[str] = []
    new_entries = _fill_fn(seed, noise_std, template, teacher_cfg.max_len)

    def fill(path: Path, shape: tuple[int, ...]) -> np.ndarray:
        filled.append("/".join(path))
        return new_entries(path, shape)

    widened = widen_decoder(
        flat_teacher,
        teacher_cfg,
        student_cfg,
        method="fpi" if width == HYPERCLONING else width,
        maps=maps,
        fill_fn=fill,
    )
    student, from_template = merge.strict_merge(deepen_decoder(widened, plan), template)
    report = RemapReport(plan.sources, plan.identity, from_template, (), tuple(filled))
    return student, report
