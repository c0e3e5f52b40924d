"""``mm.plot_spectral_density``: the drawn curve is the density it was given."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import mlmap as mm


def test_plot_spectral_density_draws_the_density_and_refuses_bad_shapes():
  """The curve is the density on the grid (clipped at ``floor`` on the log axis);
  eigenvalues are marked; mismatched shapes raise naming both."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  a = jnp.diag(jnp.array([0.5, 1.0, 4.0]))
  t = jnp.linspace(-1.0, 6.0, 71)
  phi = jax.jit(lambda: mm.spectral_density(lambda v: a @ v, jnp.zeros(3),
                                            jax.random.PRNGKey(0), 4, 3, t, 0.1))()
  ax = mm.plot_spectral_density(t, phi, eigenvalues=jnp.array([0.5, 1.0, 4.0]), label="A")
  x, y = ax.lines[0].get_xdata(), ax.lines[0].get_ydata()
  np.testing.assert_allclose(x, np.asarray(t))
  np.testing.assert_allclose(y, np.maximum(np.asarray(phi), 1e-12))
  assert ax.get_yscale() == "log" and list(ax.lines[1].get_xdata()) == [0.5, 1.0, 4.0]
  lin = mm.plot_spectral_density(t, phi, log=False)
  assert lin.get_yscale() == "linear"
  np.testing.assert_allclose(lin.lines[0].get_ydata(), np.asarray(phi))
  with pytest.raises(ValueError, match=r"density has shape \(70,\), grid \(71,\)"):
    mm.plot_spectral_density(t, phi[:-1])
  with pytest.raises(ValueError, match="grid must be 1-d"):
    mm.plot_spectral_density(t.reshape(1, -1), phi.reshape(1, -1))
  plt.close("all")
