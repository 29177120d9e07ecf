"""Permutation alignment (model re-basin): specs derived by tracing, weight/activation/STE matching, apply.

Example:
    >>> from lmc_lightning.weights.permutation import align, derive_spec
    >>> print(derive_spec(net_a))                 # which axes share a permutation
    >>> aligned_b, perm = align(net_a, net_b)     # weight matching; aligned_b computes the same function as net_b
    >>> aligned, perms = align_many([net_a, net_b, net_c], order="iterative")   # N-way (MergeMany)
"""

from lmc_lightning.weights.permutation.activation_matching import activation_matching
from lmc_lightning.weights.permutation.align import METHODS, align, align_weights
from lmc_lightning.weights.permutation.apply import Permutation, apply_permutation, identity, invert
from lmc_lightning.weights.permutation.check import EquivalenceError, check_equivalence, probe_input
from lmc_lightning.weights.permutation.many import ORDERS, ManyAlignment, align_many, align_many_weights
from lmc_lightning.weights.permutation.solvers import SOLVERS
from lmc_lightning.weights.permutation.spec import Axis, PermutationSpec
from lmc_lightning.weights.permutation.ste import ste_matching
from lmc_lightning.weights.permutation.trace import SpecDerivationError, derive_spec
from lmc_lightning.weights.permutation.weight_matching import MatchResult, weight_matching

__all__ = [
    "METHODS", "ORDERS", "SOLVERS", "Axis", "EquivalenceError", "ManyAlignment", "MatchResult", "Permutation",
    "PermutationSpec", "SpecDerivationError", "activation_matching", "align", "align_many", "align_many_weights",
    "align_weights", "apply_permutation", "check_equivalence", "derive_spec", "identity", "invert", "probe_input",
    "ste_matching", "weight_matching",
]
