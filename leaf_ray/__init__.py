"""leaf-ray: LeaF confounder detection and causal attention distillation on Ray."""
__version__ = "0.1.0"
