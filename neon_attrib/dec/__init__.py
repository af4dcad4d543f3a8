"""DEC surrogates of a classifier: Deep Embedded Clustering of activations, the surrogate, similar examples, concepts.

See SPEC §5 and ``docs/dec.md``.
"""

from .model import DEC, DECEncoder, FeatureScale, SphereNorm, student_t_assignment, target_distribution

__all__ = ["DEC", "DECEncoder", "FeatureScale", "SphereNorm", "student_t_assignment", "target_distribution"]
