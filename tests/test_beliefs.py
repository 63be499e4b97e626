"""Beliefs I/O (contract 3) and its validation (contract 5), without sampling."""

from __future__ import annotations

import numpy as np
import pytest

from engine.audit.beliefs import BeliefSet, beliefs_from_arrays
from engine.audit.beliefs_files import load_beliefs
from engine.errors import InputError


def univariate_arrays(C=2, T=5, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "mu_q": rng.normal(size=(C, T)),
        "sigma_q": rng.uniform(0.5, 1.5, (C, T)),
        "observed": rng.normal(size=(C, T, n)),
        "n_obs": rng.integers(1, n + 1, (C, T)),
        "prior_mu": rng.normal(size=T),
        "prior_sigma": 1.5,
        "obs_sigma": rng.uniform(0.5, 2.0, (1, T)),
        "checkpoint": np.array(["early", "late"][:C]),
        "token": np.arange(10, 10 + T),
    }


def multivariate_arrays(C=2, T=4, n=3, K=3, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(K, K))
    return {
        "mu_q": rng.normal(size=(C, T, K)),
        "cov_q": np.broadcast_to(np.eye(K) * 0.5, (C, T, K, K)).copy(),
        "observed": rng.normal(size=(C, T, n, K)),
        "prior_mu": np.zeros(K),
        "prior_cov": a @ a.T + K * np.eye(K),
        "obs_cov": np.eye(K) * 2.0,
    }


def save(arrays: dict, path):
    """Write a beliefs mapping as .npz, .pt or .nc (labels as coordinates)."""
    path = str(path)
    if path.endswith(".npz"):
        np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    elif path.endswith(".pt"):
        import torch

        torch.save({k: torch.as_tensor(np.asarray(v)) if np.asarray(v).dtype.kind != "U"
                    else np.asarray(v).tolist() for k, v in arrays.items()}, path)
    else:
        import xarray as xr

        C, T = np.shape(arrays["mu_q"])[:2]
        dims = {
            "mu_q": ("checkpoint", "token"), "sigma_q": ("checkpoint", "token"),
            "observed": ("checkpoint", "token", "obs"), "n_obs": ("checkpoint", "token"),
            "prior_mu": ("token",), "prior_sigma": (), "obs_sigma": ("one", "token"),
        }
        ds = xr.Dataset(
            {k: (dims[k], np.asarray(arrays[k])) for k in dims},
            coords={"checkpoint": arrays["checkpoint"], "token": arrays["token"]},
        )
        ds.to_netcdf(path)
    return path


def test_univariate_normalised_shapes_and_labels():
    bs = beliefs_from_arrays(univariate_arrays())
    assert bs.kind == "univariate" and (bs.num_checkpoints, bs.num_tokens, bs.max_num_obs) == (2, 5, 4)
    for name in ("sigma_q", "prior_mu", "prior_sigma", "obs_sigma"):
        assert bs[name].shape == (2, 5)
    assert bs.tokens.tolist() == list(range(10, 15)) and bs.checkpoints.tolist() == ["early", "late"]
    assert bs.flat("observed").shape == (10, 4)


def test_checkpoint_axis_may_be_omitted():
    arrays = univariate_arrays(C=1)
    squeezed = {k: (v[0] if k in ("mu_q", "sigma_q", "observed", "n_obs") else v) for k, v in arrays.items()}
    squeezed.pop("checkpoint")
    bs = beliefs_from_arrays(squeezed)
    assert bs.num_checkpoints == 1 and bs["mu_q"].shape == (1, 5)
    valid = np.arange(4) < arrays["n_obs"][..., None]
    np.testing.assert_array_equal(bs["observed"][valid], arrays["observed"][valid])


def test_mask_is_compacted_like_n_obs():
    arrays = univariate_arrays()
    rng = np.random.default_rng(5)
    mask = rng.random(arrays["observed"].shape) < 0.6
    mask[..., 0] = True
    observed = np.where(mask, arrays["observed"], np.nan)  # masked slots may be anything
    a = {**arrays, "observed": observed, "mask": mask}
    a.pop("n_obs")
    bs = beliefs_from_arrays(a)
    np.testing.assert_array_equal(bs.num_obs, mask.sum(-1))
    for c in range(2):
        for t in range(5):
            k = mask[c, t].sum()
            np.testing.assert_array_equal(bs["observed"][c, t, :k], arrays["observed"][c, t][mask[c, t]])
            assert np.isfinite(bs["observed"][c, t]).all()


def test_torch_and_jax_inputs_match_numpy():
    import jax.numpy as jnp
    import torch

    arrays = univariate_arrays()
    ref = beliefs_from_arrays(arrays)
    as_torch = {k: torch.as_tensor(v) if k not in ("checkpoint",) else v for k, v in arrays.items()}
    as_jax = {k: jnp.asarray(v) if k not in ("checkpoint",) else v for k, v in arrays.items()}
    for other in (beliefs_from_arrays(as_torch), beliefs_from_arrays(as_jax)):
        for name in ref.fields:
            np.testing.assert_array_equal(np.asarray(other[name]), ref[name])
        np.testing.assert_array_equal(other.num_obs, ref.num_obs)


def test_npz_pt_nc_load_identically(tmp_path):
    arrays = univariate_arrays()
    sets = [load_beliefs(save(arrays, tmp_path / f"b{ext}")) for ext in (".npz", ".pt", ".nc")]
    for other in sets[1:]:
        assert other.kind == sets[0].kind
        for name in sets[0].fields:
            np.testing.assert_array_equal(np.asarray(other[name]), sets[0][name])
        np.testing.assert_array_equal(other.num_obs, sets[0].num_obs)
        assert other.checkpoints.tolist() == sets[0].checkpoints.tolist()
        assert other.tokens.tolist() == sets[0].tokens.tolist()


def test_several_files_stack_as_checkpoints(tmp_path):
    arrays = univariate_arrays(C=2)
    paths = []
    for c in range(2):
        one = {k: (v[c] if k in ("mu_q", "sigma_q", "observed", "n_obs") else v) for k, v in arrays.items()}
        one.pop("checkpoint")
        paths.append(save(one, tmp_path / f"ckpt{c}.npz"))
    bs = load_beliefs(paths)
    assert bs.checkpoints.tolist() == ["ckpt0", "ckpt1"]
    np.testing.assert_array_equal(bs["mu_q"], arrays["mu_q"])


def test_multivariate_defaults_and_shared_observations():
    arrays = multivariate_arrays()
    arrays["observed"] = arrays["observed"][0]  # [T, n, K]: same at every checkpoint
    del arrays["obs_cov"]
    bs = beliefs_from_arrays(arrays)
    assert bs.kind == "multivariate" and bs.dim == 3
    np.testing.assert_array_equal(bs["obs_cov"][1, 2], np.eye(3))
    assert bs["observed"].shape == (2, 4, 3, 3)


def _bad(mutate, kind="univariate"):
    arrays = univariate_arrays() if kind == "univariate" else multivariate_arrays()
    mutate(arrays)
    with pytest.raises(InputError) as info:
        beliefs_from_arrays(arrays)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _set(name, index, value):
    def mutate(a):
        a[name] = np.array(a[name], dtype=float)
        a[name][index] = value
    return mutate


@pytest.mark.parametrize(
    "mutate, kind, expect",
    [
        (_set("mu_q", (1, 3), np.nan), "univariate", ["'mu_q'", "non-finite", "[1, 3]", "'late'"]),
        (_set("observed", (0, 2, 0), np.inf), "univariate", ["'observed'", "[0, 2, 0]"]),
        (_set("sigma_q", (0, 4), -0.1), "univariate", ["'sigma_q'", "> 0", "[0, 4]"]),
        (_set("sigma_q", (1, 0), 0.0), "univariate", ["'sigma_q'", "[1, 0]"]),
        (lambda a: a.__setitem__("prior_sigma", np.ones(7)), "univariate", ["'prior_sigma'", "broadcast"]),
        (lambda a: a.pop("observed"), "univariate", ["'observed'", "missing"]),
        (lambda a: a.pop("sigma_q"), "univariate", ["'sigma_q'", "missing"]),
        (lambda a: a.__setitem__("temperature", 1.0), "univariate", ["'temperature'", "unknown"]),
        (lambda a: a.__setitem__("n_obs", np.full((2, 5), 9)), "univariate", ["'n_obs'", "[0, 0]"]),
        (_set("cov_q", (1, 2, 0, 1), 0.3), "multivariate", ["'cov_q'", "not symmetric", "[1, 2]"]),
        (lambda a: a.__setitem__("prior_cov", -np.eye(3)), "multivariate", ["'prior_cov'", "positive definite"]),
        (_set("obs_cov", (0, 0), np.nan), "multivariate", ["'obs_cov'", "non-finite"]),
    ],
)
def test_bad_arrays_name_field_and_first_index(mutate, kind, expect):
    msg = _bad(mutate, kind)
    for piece in expect:
        assert piece in msg, msg


def test_file_errors(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_beliefs(tmp_path / "missing.npz")
    (tmp_path / "b.csv").write_text("mu_q\n1\n")
    with pytest.raises(InputError, match="unsupported extension '.csv'"):
        load_beliefs(tmp_path / "b.csv")
    for ext in (".npz", ".pt", ".nc"):
        (tmp_path / f"corrupt{ext}").write_bytes(b"\x00not a real file" * 10)
        with pytest.raises(InputError, match="could not read"):
            load_beliefs(tmp_path / f"corrupt{ext}")


class _Exploit:
    """Unpickling this would create a file; weights_only loading must refuse it unexecuted."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pt_with_pickled_objects_is_refused_not_executed(tmp_path):
    import torch

    marker = tmp_path / "executed"
    arrays = {k: torch.as_tensor(np.asarray(v)) for k, v in univariate_arrays().items() if k != "checkpoint"}
    arrays["payload"] = _Exploit(str(marker))
    torch.save(arrays, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="pickled objects") as info:
        load_beliefs(tmp_path / "evil.pt")
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_beliefset_is_frozen():
    bs = beliefs_from_arrays(univariate_arrays())
    assert isinstance(bs, BeliefSet)
    with pytest.raises(AttributeError):
        bs.kind = "multivariate"
