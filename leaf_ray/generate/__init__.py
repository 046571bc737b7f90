"""Text generation: one backend interface (transformers / vLLM), a Ray Data actor pool around it, and what
is built on it: teacher responses filtered by answer, and the correctness check for Stage 1 selection and
verification (`correctness`).

Import from the submodules (`backends`, `pipeline`); this package import stays light (no torch, no Ray).
"""
