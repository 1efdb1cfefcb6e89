"""Set-to-model layer: fit a diagonal Gaussian or a mixture of them to each set, and score queries.

The fits are batched over padded sets and run on CPU or CUDA in float32 or float64. They
are differentiable with respect to the set's points, so an embedding network can be
trained through them, as in Vakhitov, Kuzmin and Lempitsky, "Set2Model Networks: Learning
Discriminatively To Learn Generative Models" (CVIU 2018). The objective that every fit
maximises is stated in :mod:`s2m.mixture.prior`.
"""

from s2m.mixture.fit import ConvergenceWarning, fit_diagonal_gaussian, fit_diagonal_gmm
from s2m.mixture.implicit import (
    implicit_gradient_dense,
    objective_hessian_dense,
    pack_parameters,
    solve_hessian_structured,
)
from s2m.mixture.model import GaussianMixtureFit, mixture_log_prob
from s2m.mixture.prior import VariancePrior

__all__ = [
    "ConvergenceWarning",
    "GaussianMixtureFit",
    "VariancePrior",
    "fit_diagonal_gaussian",
    "fit_diagonal_gmm",
    "implicit_gradient_dense",
    "mixture_log_prob",
    "objective_hessian_dense",
    "pack_parameters",
    "solve_hessian_structured",
]
