"""Stage 1 of LeaF: gradient-based confounder detection and span-pruned counterfactuals (docs/design.md §1).

The method is pure torch / Python, one small module per step, each unit-tested without Ray:

- :mod:`leaf_ray.detect.saliency`: ``g_i = ||dL/de_i||_2`` per token, for a padded batch (Stage 1a).
- :mod:`leaf_ray.detect.confounders`: min-max normalisation, ``Δ``, threshold rules, confounder spans.
- :mod:`leaf_ray.detect.pruning`: one counterfactual per span, character-exact (Stage 1b).
- :mod:`leaf_ray.detect.response`: reasoning-step segments and (prefix, continuation) pairs (response level).
- :mod:`leaf_ray.detect.cross_tokenizer`: teacher scores projected onto student tokens by character overlap.

Nothing is imported here so that ``import leaf_ray.detect.<module>`` stays cheap for the CLI.
"""
