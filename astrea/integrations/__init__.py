"""astrea.ops inside models written elsewhere.

* :mod:`astrea.integrations.transformers`: ``apply_astrea(model)`` runs the routing and
  the dispatch/combine of Hugging Face transformers MoE models (Mixtral, Qwen2-MoE, OLMoE,
  Qwen3-VL-MoE and blocks of the same "router + fused experts" pattern) on astrea ops.
  Needs ``pip install astrea[hf]``.

The submodules import their frameworks, so this package imports none of them.
"""
