"""Parameter remapping: a trained small model's weights grown into a larger model.

`remap_params(teacher_params, teacher_cfg, student_cfg, depth=..., width=...)` returns
a tree with exactly the student's structure; the layer maps (`depth.py`), unit maps
and widening rules (`width.py`, `rules.py`) and the strict merge (`merge.py`) are
pure functions of their own.

Which variants compute exactly the teacher's function (float32, up to summation
order; max |Δ| of MLM logits measured on the tests/remap configs in brackets):

- depth 'identity' with pre-LN: exact (the new blocks add zero to the residual) [0.0].
- width 'fpi' on the MLP alone (F grows, D and H equal): exact (GELU is elementwise
  and the output projection's split rows sum back to the old rows) [2.4e-7].
- width 'fpi' on heads and head dim: each attention block's output is exact
  (copied heads, split output rows, query split and rescaled by sqrt(K_s/K_t)); the
  model as a whole is exact only if the hidden width is, see next [block
  output 6e-8].
- width 'fpi' on the hidden size with `new_units='cyclic'` and D_s a multiple of D_t:
  exact — every unit is copied equally often, so LayerNorm means and variances are
  unchanged; the MLM transform LayerNorm is split so the tied decoder sums back [3.6e-7].

Approximate (tests check closeness to the teacher against a random student):
- 'fpi' hidden width with random new units: LayerNorm statistics now weight the
  copied units by their copy counts, so hidden states drift.
- depth 'fna', 'stack', 'interleave': the repeated layers change the function.
- width 'aki': new units take their incoming weights from the next teacher layer.
- width 'noise': the new units' weights are noise (or zero) and LayerNorms see them.

Width 'hypercloning' (HyperCloning, Samragh et al. 2024) is 'fpi' with cyclic new units,
refused unless the hidden size is a multiple of the teacher's: exact for BERT (above)
and for decoders.

Decoders (GPT-2, Llama families; `decoder.py`, docs/methods.md#decoder-growth): depth
'identity' and width 'hypercloning' are exact, alone or together, tied heads included (the
final norm is divided by the copy count n); 'fpi' is exact at an unchanged hidden size;
the rest is approximate.
"""

from dwt_jax.remap.decoder import (
    DECODER_WIDTH_METHODS,
    DecoderUnitMaps,
    check_decoder_configs,
    decoder_unit_maps,
)
from dwt_jax.remap.depth import (
    DEPTH_METHODS,
    DepthPlan,
    deepen,
    depth_plan,
    identity_layers,
    layer_map,
)
from dwt_jax.remap.grow import WIDTH_METHODS, remap_params, remap_params_with_report
from dwt_jax.remap.merge import flatten, strict_merge, unflatten
from dwt_jax.remap.report import RemapReport
from dwt_jax.remap.width import (
    NEW_UNITS,
    UnitMaps,
    copy_counts,
    make_unit_maps,
    unit_map,
    widen_params,
    widen_tensor,
)

__all__ = [
    "DECODER_WIDTH_METHODS",
    "DEPTH_METHODS",
    "NEW_UNITS",
    "WIDTH_METHODS",
    "DecoderUnitMaps",
    "DepthPlan",
    "RemapReport",
    "UnitMaps",
    "check_decoder_configs",
    "copy_counts",
    "decoder_unit_maps",
    "deepen",
    "depth_plan",
    "flatten",
    "identity_layers",
    "layer_map",
    "make_unit_maps",
    "remap_params",
    "remap_params_with_report",
    "strict_merge",
    "unflatten",
    "unit_map",
    "widen_params",
    "widen_tensor",
]
