"""Permutation alignment (model re-basin): specs derived by tracing, weight/activation/STE matching, apply.

Example:
    >>> from lmc_lightning.weights.permutation import align, derive_spec
    >>> print(derive_spec(net_a))                 # which axes share a permutation
    >>> aligned_b, perm = align(net_a, net_b)     # weight matching; aligned_b computes the same function as net_b
"""

from lmc_lightning.weights.permutation.activation_matching import activation_matching
from lmc_lightning.weights.permutation.align import METHODS, align, align_weights
from lmc_lightning.weights.permutation.apply import Permutation, apply_permutation, identity, invert
from lmc_lightning.weights.permutation.spec import Axis, PermutationSpec
from lmc_lightning.weights.permutation.ste import ste_matching
from lmc_lightning.weights.permutation.trace import SpecDerivationError, derive_spec
from lmc_lightning.weights.permutation.weight_matching import MatchResult, weight_matching

__all__ = [
    "METHODS", "Axis", "MatchResult", "Permutation", "PermutationSpec", "SpecDerivationError", "activation_matching",
    "align", "align_weights", "apply_permutation", "derive_spec", "identity", "invert", "ste_matching",
    "weight_matching",
]
