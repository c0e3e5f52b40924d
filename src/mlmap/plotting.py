"""Figures of mlmap's estimates (matplotlib, imported only when a function is called)."""

from __future__ import annotations

import numpy as np


def plot_spectral_density(grid, density, *, ax=None, log=True, eigenvalues=None,
                          label=None, floor=1e-12):
  r"""Draw an eigenvalue density from :func:`mlmap.spectral_density`.

  The curve is ``density`` against ``grid`` (a 1-d grid). With ``log=True``
  (the default, as in Ghorbani et al. 2019 and PyHessian) the y axis is
  logarithmic and values below ``floor`` are clipped to it, because the
  density of a network's Hessian spans many decades: a bulk near zero and a
  few outliers. ``eigenvalues`` (e.g. the Ritz values of
  :func:`mlmap.lanczos_eigenvalues`) are marked as ticks along the x axis.

  Args:
    grid: 1-d array of the points ``t``.
    density: array of ``phi_sigma(t)``, ``grid``'s shape.
    ax: a matplotlib ``Axes`` to draw on; default a new figure's.
    log: logarithmic y axis.
    eigenvalues: optional 1-d array of eigenvalues to mark.
    label: legend label of the curve.
    floor: lower clip of the density on a log axis, > 0.

  Returns:
    The ``Axes``.

  Raises:
    ImportError: matplotlib is not installed (``pip install matplotlib``).
    ValueError: ``grid`` is not 1-d, or ``density``'s shape differs from it.

  Examples:
    >>> import jax, jax.numpy as jnp, mlmap as mm
    >>> import matplotlib; matplotlib.use("Agg")
    >>> a = jnp.diag(jnp.arange(1.0, 6.0))
    >>> t = jnp.linspace(0, 6, 61)
    >>> phi = mm.spectral_density(lambda v: a @ v, jnp.zeros(5), jax.random.PRNGKey(0),
    ...                           4, 5, t, 0.2)
    >>> ax = mm.plot_spectral_density(t, phi)
    >>> ax.get_yscale(), len(ax.lines)
    ('log', 1)
  """
  try:
    import matplotlib.pyplot as plt
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("plot_spectral_density needs matplotlib: pip install matplotlib") from e
  grid, density = np.asarray(grid, float), np.asarray(density, float)
  if grid.ndim != 1:
    raise ValueError(f"plot_spectral_density: grid must be 1-d, got shape {grid.shape}.")
  if density.shape != grid.shape:
    raise ValueError(f"plot_spectral_density: density has shape {density.shape}, grid "
                     f"{grid.shape}; pass the output of spectral_density on this grid.")
  if not floor > 0:
    raise ValueError(f"plot_spectral_density: floor must be > 0, got {floor!r}.")
  if ax is None:
    _, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
  y = np.maximum(density, floor) if log else density
  ax.plot(grid, y, label=label)
  if log:
    ax.set_yscale("log")
  if eigenvalues is not None:
    ev = np.ravel(np.asarray(eigenvalues, float))
    ax.plot(ev, np.full(ev.shape, y.min() if log else 0.0), "|", color="k", ms=10,
            label="eigenvalues")
  ax.set(xlabel="eigenvalue", ylabel="density")
  if label is not None or eigenvalues is not None:
    ax.legend(fontsize=8)
  return ax
