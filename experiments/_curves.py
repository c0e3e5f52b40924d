"""A CURVES-like image data set (Hinton & Salakhutdinov 2006), made here.

Each image is a random cubic Bezier curve (four control points drawn uniformly
in the image, away from the border) rendered with antialiasing: dense points
along the curve are splatted bilinearly onto the pixel grid, the density is
scaled to about one unit of ink per pixel crossed, blurred with a 3x3 binomial
kernel and clipped to [0, 1]. Fully determined by ``seed``
(``numpy.random.default_rng``); no download.

References:
  Hinton & Salakhutdinov, "Reducing the dimensionality of data with neural
  networks", Science 2006 (the CURVES data set).
"""

from __future__ import annotations

import numpy as np

_POINTS = 200  # samples along each curve; spacing below a pixel for size 28
_STROKE = 1.5  # ink per pixel crossed, before clipping


def _bezier(ctrl, t):
  """Points of cubic Bezier curves: ``ctrl`` (n, 4, 2), ``t`` (m,) -> (n, m, 2)."""
  t = t[None, :, None]
  c = [ctrl[:, k:k + 1, :] for k in range(4)]
  return ((1 - t) ** 3 * c[0] + 3 * (1 - t) ** 2 * t * c[1]
          + 3 * (1 - t) * t ** 2 * c[2] + t ** 3 * c[3])


def _splat(pts, size):
  """Bilinear splat of points (n, m, 2) in pixel units onto (n, size, size) images."""
  n, m, _ = pts.shape
  img = np.zeros((n, size * size))
  x0 = np.floor(pts).astype(int)
  frac = pts - x0
  rows = np.repeat(np.arange(n), m)
  for dx in (0, 1):
    for dy in (0, 1):
      w = (frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
      ix, iy = x0[..., 0] + dx, x0[..., 1] + dy
      ok = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
      np.add.at(img, (rows[ok.ravel()], (iy * size + ix)[ok]), w[ok])
  return img.reshape(n, size, size)


def _blur(img):
  """3x3 binomial blur (kernel [1, 2, 1] / 4 along each axis), zero padded."""
  pad = np.pad(img, ((0, 0), (1, 1), (1, 1)))
  rows = (pad[:, :-2] + 2 * pad[:, 1:-1] + pad[:, 2:]) / 4
  return (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4


def make_curves(n: int, seed: int, size: int = 28) -> np.ndarray:
  """``n`` random antialiased curve images, flattened.

  Args:
    n: number of images, >= 1.
    seed: seed of ``numpy.random.default_rng``; the same seed gives the same images.
    size: image side in pixels (>= 8).

  Returns:
    ``(n, size * size)`` float32 array with values in [0, 1].

  Raises:
    ValueError: ``n < 1`` or ``size < 8``.
  """
  if n < 1 or size < 8:
    raise ValueError(f"make_curves: need n >= 1 and size >= 8, got n={n}, size={size}.")
  rng = np.random.default_rng(seed)
  margin = 0.1 * size
  ctrl = rng.uniform(margin, size - 1 - margin, size=(n, 4, 2))
  pts = _bezier(ctrl, np.linspace(0.0, 1.0, _POINTS))
  length = np.linalg.norm(np.diff(pts, axis=1), axis=-1).sum(1)  # (n,) in pixels
  ink = _splat(pts, size) * (_STROKE * length / _POINTS)[:, None, None]
  img = np.clip(_blur(ink) * 1.6, 0.0, 1.0)
  return img.reshape(n, size * size).astype(np.float32)
