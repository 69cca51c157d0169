"""Cooperation: models with different roles working on one answer at decode time (DESIGN.md §1).

Each module registers one strategy; the pure math of each is a small function over log-prob
tensors at the top of its module.
"""

STRATEGY_MODULES = ("speculative", "contrastive", "proxy", "verify", "compress", "detect", "federated")
