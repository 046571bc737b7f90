"""Experiments built on the product: each runs the real stages on a task of its own and reports on it.

Nothing in the product (the stage packages, `pipeline`, `bench`) imports an experiment; the CLI does.
"""
