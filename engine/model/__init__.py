"""From a PyMC template to JAX: ``compile`` (log density, constrain, pointwise log-likelihood,
ragged padding), ``linalg`` (small factorisations in plain XLA ops), ``_pymc_jax`` (PyMC's
JAX bridge without its import side effect)."""
