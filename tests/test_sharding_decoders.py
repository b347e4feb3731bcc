"""Sharding of the decoder families: the layout of every GPT-2 and Llama parameter is
pinned by a golden file and checked against the Megatron/FSDP layout by hand; a
sharded Llama (grouped-query attention on the tensor axis) computes what one device
does.

Regenerate the golden file after a deliberate change of the rules or the models with
``DWT_JAX_UPDATE_GOLDEN=1 python -m pytest tests/test_sharding_decoders.py``.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from dwt_step_helpers import fewer_xla_passes
from flax import linen as nn
from flax import traverse_util
from testutil import REPO_ROOT, load_config

from dwt_jax import sharding
from dwt_jax.errors import ConfigError
from dwt_jax.models.families import make_lm, model_config_from
from dwt_jax.teachers import abstract_params, boxed_params

GOLDEN = os.path.join(REPO_ROOT, "tests", "golden", "partition_specs_decoders.json")

# Small members of each family with every optional parameter: Llama with grouped-query
# attention (4 query heads over 2 key/value heads), an untied head, q/k/v biases and
# q/k norms; GPT-2 with its fused [D,3,H,K] projection and learned positions.
MODELS = {
    "gpt2": {
        "family": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
        "num_heads": 4, "mlp_dim": 64, "max_len": 16,
    },
    "llama": {
        "family": "llama", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
        "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64, "max_len": 16,
        "tie_embeddings": False, "qkv_bias": True, "qk_norm": True,
    },
}  # fmt: skip


def _layouts() -> dict[str, str]:
    """'<model> <rules> <param path>' → its mesh PartitionSpec, for each decoder under
    every rules table (the student's and each teacher layout)."""
    layouts: dict[str, str] = {}
    for name, section in MODELS.items():
        boxed = boxed_params(make_lm(model_config_from(section)))
        for rules_name, rules in sharding.TEACHER_RULES.items():
            specs = traverse_util.flatten_dict(sharding.partition_specs(boxed, rules), sep="/")
            for path, spec in sorted(specs.items()):
                layouts[f"{name} {rules_name} {path}"] = str(tuple(spec))
    return layouts


@pytest.fixture(scope="module")
def layouts() -> dict[str, str]:
    return _layouts()


def test_partition_specs_match_the_golden_file(layouts):
    if os.environ.get("DWT_JAX_UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(layouts, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        golden = json.load(f)
    changed = {k: (golden.get(k), v) for k, v in layouts.items() if golden.get(k) != v}
    missing = sorted(set(golden) - set(layouts))
    assert not changed and not missing, (
        f"layouts changed (golden, now): {changed}; gone: {missing}. If deliberate, rerun "
        "with DWT_JAX_UPDATE_GOLDEN=1."
    )


# The Megatron/FSDP layout, written out by hand: heads (query and key/value), MLP
# units and the vocabulary over 'tensor'; the hidden dimension of every weight over
# 'fsdp'; head width, q/k/v index, positions and norms whole.
EXPECTED = {
    "llama student model/embed_tokens/embedding": ("tensor", "fsdp"),
    "llama student lm_head/kernel": ("fsdp", "tensor"),
    "llama student model/layers_1/self_attn/q_proj/kernel": ("fsdp", "tensor", None),
    "llama student model/layers_1/self_attn/k_proj/kernel": ("fsdp", "tensor", None),
    "llama student model/layers_1/self_attn/v_proj/kernel": ("fsdp", "tensor", None),
    "llama student model/layers_1/self_attn/k_proj/bias": ("tensor", None),
    "llama student model/layers_1/self_attn/o_proj/kernel": ("tensor", None, "fsdp"),
    "llama student model/layers_1/self_attn/q_norm/scale": (None,),
    "llama student model/layers_1/mlp/gate_proj/kernel": ("fsdp", "tensor"),
    "llama student model/layers_1/mlp/up_proj/kernel": ("fsdp", "tensor"),
    "llama student model/layers_1/mlp/down_proj/kernel": ("tensor", "fsdp"),
    "llama student model/layers_1/input_layernorm/scale": (None,),
    "llama student model/norm/scale": (None,),
    "gpt2 student transformer/wte/embedding": ("tensor", "fsdp"),
    "gpt2 student transformer/wpe/embedding": (None, "fsdp"),
    "gpt2 student transformer/h_0/attn/c_attn/kernel": ("fsdp", None, "tensor", None),
    "gpt2 student transformer/h_0/attn/c_attn/bias": (None, "tensor", None),
    "gpt2 student transformer/h_0/attn/c_proj/kernel": ("tensor", None, "fsdp"),
    "gpt2 student transformer/h_0/mlp/c_fc/kernel": ("fsdp", "tensor"),
    "gpt2 student transformer/h_0/mlp/c_proj/kernel": ("tensor", "fsdp"),
    "gpt2 student transformer/h_0/ln_1/scale": (None,),
    "gpt2 student transformer/ln_f/bias": (None,),
    # Teachers kept whole across data/fsdp still split heads over tensor.
    "llama no_fsdp model/layers_0/self_attn/k_proj/kernel": (None, "tensor", None),
    "gpt2 no_fsdp transformer/h_0/attn/c_attn/kernel": (None, None, "tensor", None),
}


def test_layouts_are_megatron_and_fsdp(layouts):
    """Checks by hand that hold whatever the golden file says."""
    for key, spec in EXPECTED.items():
        assert eval(layouts[key]) == spec, key
    for key, value in layouts.items():
        spec = [axis for axis in eval(value) if axis is not None]
        assert len(spec) == len(set(spec)), f"{key}: a mesh axis used twice ({value})"
        if key.split("/")[-1] == "scale":
            assert set(eval(value)) == {None}, f"{key}: norms stay whole ({value})"
        if key.split()[1] == "replicated":
            assert set(eval(value)) <= {None}, f"{key}: a replicated teacher is whole"
        if key.split()[1] == "no_fsdp":
            assert "fsdp" not in value, key


def test_grouped_query_heads_must_divide_the_tensor_axis():
    cfg = model_config_from(MODELS["llama"])  # 2 key/value heads.
    sharding.check_model_fits_mesh(cfg, {"data": 1, "fsdp": 4, "tensor": 2}, "model")
    with pytest.raises(
        ConfigError, match=r"model\.num_kv_heads=2 is not divisible by mesh\.tensor=4"
    ):
        sharding.check_model_fits_mesh(cfg, {"data": 1, "fsdp": 2, "tensor": 4}, "model")


def test_sharded_llama_computes_what_one_device_does():
    """Params laid out by the rules on a data × fsdp × tensor mesh (the 2 key/value
    heads split over tensor=2); logits and hidden states equal the single device's."""
    model = make_lm(model_config_from(MODELS["llama"]))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, (4, 16)).astype(np.int32)
    segments = np.repeat([[1] * 10 + [2] * 4 + [0] * 2], 4, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(10), np.arange(4), [0, 0]])[None].repeat(4, 0)
    batch = {"input_ids": ids, "segment_ids": segments, "positions": positions.astype(np.int32)}
    config = load_config("smoke").mesh
    config.update(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(config)
    _, shardings = abstract_params(model, mesh)

    def apply(params, batch):
        logits, out = model.apply({"params": params}, **batch, deterministic=True)
        return logits, out["hidden"]

    with fewer_xla_passes():
        init = lambda: model.init(jax.random.PRNGKey(0), **batch, deterministic=True)
        params = jax.device_get(nn.meta.unbox(jax.jit(init)()["params"]))
        want = jax.jit(apply)(params, batch)
        placed = sharding.put_on_mesh(params, shardings)
        k_proj = placed["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"]
        assert tuple(k_proj.sharding.spec) == ("fsdp", "tensor", None)
        assert k_proj.addressable_shards[0].data.shape == (16, 1, 8)  # D/2, G/2, K.
        with sharding.activate(mesh):
            got = jax.jit(apply)(placed, sharding.shard_batch(batch, mesh))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
