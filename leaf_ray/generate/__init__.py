"""Text generation: one backend interface (transformers / vLLM) and a Ray Data actor pool around it.

It completes prompts and judges nothing: the passes that keep or score completions live in `leaf_ray.evaluate`.
Import from the submodules (`backends`, `pipeline`); this package import stays light (no torch, no Ray).
"""
