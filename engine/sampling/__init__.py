"""Sampling every problem at once: ``kernels`` (the protocol and the registry of one-problem
kernels), ``batch`` (the driver: chunks, keys, every loop and vmap, sharding), ``api``
(``sample_batched``), ``diagnostics`` (batched R-hat, ESS, MCSE)."""
