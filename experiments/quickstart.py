"""Quickstart: MAP estimation of a flax MLP with optax, in ~40 lines.

Fits y = sin(3x) + noise with a Gaussian likelihood (sigma = 0.1) and a Gaussian
prior (sigma_0 = 1) on the weights, i.e. weight decay lambda = sigma^2/sigma_0^2,
and prints the objective, the RMS residual (which should approach the noise
scale) and the weight decay this prior equals in optax's mean-loss convention.

  python experiments/quickstart.py
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import mlmap as mm


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(32)(x))
    x = nn.tanh(nn.Dense(32)(x))
    return nn.Dense(1)(x)[..., 0]


def main():
  kx, kn, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.uniform(kx, (256, 1), minval=-1.0, maxval=1.0)
  y = jnp.sin(3.0 * x[:, 0]) + 0.1 * jax.random.normal(kn, (256,))

  model = MLP()
  params = model.init(kp, x)["params"]
  nlp = mm.negative_log_posterior(
      apply_fn=lambda p, x: model.apply({"params": p}, x),
      log_likelihood=functools.partial(mm.gaussian_log_likelihood, sigma=0.1),
      log_prior=functools.partial(mm.gaussian_log_prior, sigma=1.0),
      num_data=x.shape[0])

  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(nlp)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(2001):
    params, opt_state, loss = step(params, opt_state)
    if i % 500 == 0:
      print(f"step {i:5d}  negative log-posterior {float(loss):10.3f}")

  rms = jnp.sqrt(jnp.mean((nlp.apply_fn(params, x) - y) ** 2))
  print(f"RMS residual {float(rms):.4f} (noise sigma 0.1)")
  print(f"weight decay lambda = sigma^2/sigma_0^2 = {float(mm.prior_sigma_to_weight_decay(1.0, 0.1)):.4f}; "
        f"optax add_decayed_weights equivalent = "
        f"{float(mm.prior_sigma_to_optax_weight_decay(1.0, x.shape[0], 0.1)):.2e}")


if __name__ == "__main__":
  main()
