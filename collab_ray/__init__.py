"""collab_ray: make several LLMs work as one on Ray — merge, ensemble, cooperate.

Subpackages `core`, `models`, `merge`, `ensemble` and `cooperate` never import Ray;
`serving` (Ray Serve) and `tuning` (Ray Tune) are the only places that do.
"""

__version__ = "0.1.0"
