"""Text generation: one backend interface (transformers / vLLM), a Ray Data actor pool around it, and the
dataset pass built on it: teacher responses filtered by answer (judged by `leaf_ray.evaluate.judge`).

Import from the submodules (`backends`, `pipeline`); this package import stays light (no torch, no Ray).
"""
