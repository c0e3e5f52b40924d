"""mlmap: maximum-likelihood and MAP estimation in JAX, with exact curvature.

A flat public namespace, like optax: ``import mlmap as mm; mm.ggn_vp(...)``.
Each block below re-exports one module; keep the names listed in ``__all__``.
"""

__version__ = "0.1.0"

# --- likelihoods -------------------------------------------------------------
from mlmap.likelihoods import bernoulli_log_likelihood
from mlmap.likelihoods import categorical_log_likelihood
from mlmap.likelihoods import gaussian_log_likelihood
from mlmap.likelihoods import soft_categorical_log_likelihood

# --- priors ------------------------------------------------------------------
from mlmap.priors import flat_log_prior
from mlmap.priors import gaussian_log_prior
from mlmap.priors import laplace_log_prior
from mlmap.priors import optax_weight_decay_to_prior_sigma
from mlmap.priors import prior_sigma_to_optax_weight_decay
from mlmap.priors import prior_sigma_to_weight_decay
from mlmap.priors import weight_decay_to_prior_sigma

# --- posterior ---------------------------------------------------------------
from mlmap.posterior import NegativeLogPosterior
from mlmap.posterior import StatefulNegativeLogPosterior
from mlmap.posterior import negative_log_posterior
from mlmap._flax import from_nnx  # flax imported on call

# --- linalg (cg, lanczos) ----------------------------------------------------
from mlmap.linalg import CGInfo
from mlmap.linalg import CGStatus
from mlmap.linalg import cg
from mlmap.linalg import LanczosResult
from mlmap.linalg import lanczos
from mlmap.linalg import tridiagonal
# --- curvature ---------------------------------------------------------------
from mlmap.curvature import hvp
from mlmap.curvature import hvp_fn
from mlmap.curvature import ggn_vp
from mlmap.curvature import ggn_vp_fn
from mlmap.curvature import fisher_vp
from mlmap.curvature import fisher_vp_fn
from mlmap.curvature import empirical_fisher_vp
from mlmap.curvature import empirical_fisher_vp_fn
from mlmap.curvature import mc_fisher_vp
from mlmap.dense import hessian_matrix
from mlmap.dense import ggn_matrix
from mlmap.dense import fisher_matrix
from mlmap.dense import empirical_fisher_matrix
from mlmap.dense import ggn_diagonal
from mlmap.dense import fisher_diagonal
# --- spectral (diagonals, Hutchinson, Lanczos spectra) -----------------------
from mlmap.spectral import RitzResult
from mlmap.spectral import SLQResult
from mlmap.spectral import StochasticEstimate
from mlmap.spectral import hutchinson_diagonal
from mlmap.spectral import hutchinson_trace
from mlmap.spectral import lanczos_eigenvalues
from mlmap.spectral import slq_quadrature
from mlmap.spectral import spectral_density
from mlmap.spectral import stochastic_logdet
from mlmap.plotting import plot_spectral_density  # matplotlib imported on call
# --- optimizers --------------------------------------------------------------
from mlmap.optimizers import HessianFreeState
from mlmap.optimizers import KFACState
from mlmap.optimizers import NaturalGradientState
from mlmap.optimizers import NewtonState
from mlmap.optimizers import NonlinearCGState
from mlmap.optimizers import hessian_free
from mlmap.optimizers import kfac
from mlmap.optimizers import natural_gradient
from mlmap.optimizers import newton
from mlmap.optimizers import nonlinear_cg
# --- training ----------------------------------------------------------------
from mlmap.training import FitResult
from mlmap.training import StopTraining
from mlmap.training import fit
from mlmap._checkpoint import load_checkpoint
from mlmap.training import make_train_step
from mlmap._checkpoint import save_checkpoint
# --- laplace -----------------------------------------------------------------
from mlmap.laplace import EvidenceInfo
from mlmap.laplace_posterior import LaplacePosterior
from mlmap.laplace_structured import laplace
from mlmap.laplace_structured import log_evidence
from mlmap.structured_posterior import OptimizePriorInfo
from mlmap.structured_posterior import StructuredPosterior
from mlmap.subset import last_layer_subset
from mlmap.evidence import EvidenceHistory
from mlmap.evidence import log_evidence_grad
from mlmap.evidence import maximize_evidence
from mlmap.evidence_online import FitEvidenceResult
from mlmap.evidence_online import fit_evidence
# --- data sets (curvature summed over batches, the prior once) ---------------
from mlmap.data import accumulate
from mlmap.data import dataset_diagonal
from mlmap.data import dataset_matvec
from mlmap.data import dataset_value_and_grad
# --- sharding ----------------------------------------------------------------
from mlmap.sharding import batch_sharding
from mlmap.sharding import make_mesh
from mlmap.sharding import replicate
from mlmap.sharding import shard_batch

__all__ = (
    "bernoulli_log_likelihood",
    "categorical_log_likelihood",
    "gaussian_log_likelihood",
    "soft_categorical_log_likelihood",
    "flat_log_prior",
    "gaussian_log_prior",
    "laplace_log_prior",
    "optax_weight_decay_to_prior_sigma",
    "prior_sigma_to_optax_weight_decay",
    "prior_sigma_to_weight_decay",
    "weight_decay_to_prior_sigma",
    "NegativeLogPosterior",
    "StatefulNegativeLogPosterior",
    "negative_log_posterior",
    "from_nnx",
    "CGInfo",
    "CGStatus",
    "cg",
    "LanczosResult",
    "lanczos",
    "tridiagonal",
    "RitzResult",
    "SLQResult",
    "StochasticEstimate",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "lanczos_eigenvalues",
    "slq_quadrature",
    "spectral_density",
    "stochastic_logdet",
    "plot_spectral_density",
    "accumulate",
    "dataset_diagonal",
    "dataset_matvec",
    "dataset_value_and_grad",
    "batch_sharding",
    "make_mesh",
    "replicate",
    "shard_batch",
    "hvp",
    "hvp_fn",
    "ggn_vp",
    "ggn_vp_fn",
    "fisher_vp",
    "fisher_vp_fn",
    "empirical_fisher_vp",
    "empirical_fisher_vp_fn",
    "mc_fisher_vp",
    "hessian_matrix",
    "ggn_matrix",
    "fisher_matrix",
    "empirical_fisher_matrix",
    "ggn_diagonal",
    "fisher_diagonal",
    "HessianFreeState",
    "NaturalGradientState",
    "KFACState",
    "NewtonState",
    "NonlinearCGState",
    "hessian_free",
    "natural_gradient",
    "kfac",
    "newton",
    "nonlinear_cg",
    "EvidenceInfo",
    "LaplacePosterior",
    "laplace",
    "log_evidence",
    "OptimizePriorInfo",
    "StructuredPosterior",
    "last_layer_subset",
    "EvidenceHistory",
    "log_evidence_grad",
    "maximize_evidence",
    "fit_evidence",
    "FitEvidenceResult",
    "FitResult",
    "StopTraining",
    "fit",
    "load_checkpoint",
    "make_train_step",
    "save_checkpoint",
)
