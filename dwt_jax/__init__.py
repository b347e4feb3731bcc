"""dwt_jax: pre-training and distillation of language models in JAX/Flax."""

__version__ = "0.1.0"
