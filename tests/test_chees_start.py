"""ChEES warmup's starting step size (``chees_hmc.reasonable_step_size``) follows the target's scale."""

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.sampling.kernels.chees_hmc import MAX_STEP_SEARCH, reasonable_step_size


def _search(scale, start=1.0, chains=4, dim=3, target=0.8):
    logdensity = lambda x: -0.5 * jnp.sum((x / scale) ** 2)
    positions = scale * jax.random.normal(jax.random.key(0), (chains, dim))
    hmc = jax.vmap(lambda x: blackjax.dynamic_hmc.init(x, logdensity, jnp.zeros((), int)))(positions)
    step, grads = reasonable_step_size(logdensity, jax.random.key(1), hmc, jnp.ones(dim), start, target)
    return float(step), int(grads)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_searched_step_is_of_the_targets_scale(scale):
    # one leapfrog step of a standard normal is accepted with probability >= 0.8 up to a step of
    # order 1, and refused well before 4: the search lands within [0.25, 4] x scale from any start
    for start in (1e-6, 1.0, 1e6):
        step, grads = _search(scale, start)
        assert 0.25 * scale <= step <= 4.0 * scale, (scale, start, step)
        assert 4 <= grads <= 4 * (MAX_STEP_SEARCH + 1)


def test_search_stops_at_the_first_crossing():
    # from a start that is accepted, the answer is a doubling of it whose double is refused
    step, _ = _search(1.0, start=1 / 64)
    assert np.log2(step * 64) == pytest.approx(round(np.log2(step * 64)))
    bigger, _ = _search(1.0, start=2 * step)
    assert bigger <= 2 * step
