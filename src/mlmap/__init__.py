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
from mlmap.posterior import negative_log_posterior

# --- linalg (cg, lanczos) ----------------------------------------------------
# --- curvature ---------------------------------------------------------------
# --- spectral (diagonals, Hutchinson, Lanczos spectra) -----------------------
# --- optimizers --------------------------------------------------------------
# --- training ----------------------------------------------------------------
# --- laplace -----------------------------------------------------------------
# --- sharding ----------------------------------------------------------------

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
    "negative_log_posterior",
)
