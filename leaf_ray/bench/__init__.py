"""Benchmarks behind `leaf-ray bench ...`: each prints side-by-side ratios measured in one run."""
