"""Ensemble strategies (DESIGN §1 "Ensemble"): combine several models' outputs before, during or after inference.

route (before), fuse (during), vote / rank / moa / cascade / combine (after; combine: a learned combiner). Each module registers its strategy.
"""

STRATEGY_MODULES = ("route", "fuse", "vote", "rank", "moa", "cascade", "combiner")
