"""How an audit's chunks run: durably, resumably, by shard, keeping chosen tokens' draws.

``audit_vfe`` builds the problems and the per-problem summary; this module runs the chunk grid
(``engine.sampling.batch.run_batched``) against the run directory's :class:`~engine.audit.store.ChunkStore`
(only the chunks not yet stored, only this shard's), logs progress (``engine.audit.progress``), and
turns the kept draws of the ``keep_draws`` tokens into InferenceData.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.audit.beliefs import BeliefSet
from engine.errors import InputError
from engine.sampling.chunking import CHUNK_MEMORY_BYTES

__all__ = ["chunk_size", "CHUNK_MEMORY_BYTES", "open_store", "run_chunks", "host_summaries", "concat_chunks", "kept_problems", "kept_inference_data"]


def open_store(store_dir, overwrite, full_data, config, model, extra):
    """The run directory's ChunkStore, keyed by one hash per component of the run's identity:
    ``data`` (every array, ragged row counts), ``graph`` (the template's log density graph,
    :func:`engine.model.compile.graph_fingerprint`), ``sampler`` (``BatchConfig.identity``),
    ``precision``, and ``extra``'s entries (e.g. the resolved model config, the summaries'
    settings)."""
    import hashlib

    from engine.model.compile import graph_fingerprint

    from engine.sampling.batch import chunk_grid
    from engine.audit.store import ChunkStore

    digest = hashlib.sha256()
    for name in sorted(full_data.arrays):
        arr = np.ascontiguousarray(full_data.arrays[name])
        digest.update(name.encode() + str(arr.shape).encode() + str(arr.dtype).encode())
        digest.update(arr.tobytes())
    if full_data.num_rows is not None:
        digest.update(np.ascontiguousarray(full_data.num_rows).tobytes())
    settings = {"data": digest.hexdigest(), "graph": graph_fingerprint(model), "sampler": config.identity(),
                "precision": config.runtime.precision, **extra}
    grid = chunk_grid(full_data.num_problems, config.batch_size)
    return ChunkStore(Path(store_dir), settings, grid, overwrite=overwrite)


def run_chunks(compiled, full_data, config, summary_fn, progress, *, store=None, shard=None,
                keep=np.zeros(0, np.int64), log_file=None):
    """Run the chunks not yet done (of ``shard``), storing each as it finishes when ``store`` is
    given -> ``(summaries, kept draws)`` of the whole grid, or ``(None, None)`` for one shard of
    several. Keys, chunk grid and resume make the result the same whichever chunks ran when. Kept draws: ``{"index": [k], "values": {name: [k, chain, draw, ...]}, "stats": {...}}``
    of the problems ``keep`` (sorted flat indices), or None when none are kept."""
    from engine.sampling.batch import chunk_grid, run_batched
    from engine.audit.progress import RunLog

    grid = chunk_grid(full_data.num_problems, config.batch_size)
    index, num_shards = (0, 1) if shard is None else (int(shard[0]), int(shard[1]))
    mine = grid[index::num_shards]
    mine_set = set(mine)
    pending = mine if store is None else [c for c in store.pending() if c in mine_set]
    keep_chunks = [c for c in grid if np.any((keep >= c[0]) & (keep < c[1]))]
    memory: dict[tuple[int, int], tuple] = {}

    def kept_part(start, stop, host):
        values, stats, _ = host[0]
        rows = keep[(keep >= start) & (keep < stop)] - start
        return {
            "index": rows + start,
            "values": {k: v[rows] for k, v in values.items()},
            "stats": {k: getattr(stats, k)[rows] for k in stats._fields},
        }

    def on_chunk(start, stop, host):
        draws = kept_part(start, stop, host) if host[0][0] is not None else None
        if store is not None:
            if draws is not None:  # before the chunk file: a finished chunk always has its draws
                store.write(start, stop, draws, name="draws", check_rows=False)
            store.write(start, stop, host[2])
        else:
            memory[(start, stop)] = (host[2], draws)
        run_log.chunk(start, stop)

    done = sum(b - a for a, b in mine) - sum(b - a for a, b in pending)
    run_log = RunLog(log_file, sum(b - a for a, b in mine), done=done, unit="token")
    run_log.start(chunks_pending=len(pending), chunks=len(mine), shard=[index, num_shards],
                  config_hash=None if store is None else store.hash)
    try:
        if pending:
            run_batched(
                compiled, full_data, config, summary_fn=summary_fn, chunks=pending, progress=progress,
                on_chunk=on_chunk, keep_chunks=keep_chunks,
            )
    except BaseException as err:
        run_log.fail(err)
        if store is not None:
            store.close()
        raise
    run_log.finish()
    if num_shards > 1:
        if store is not None:
            store.close()
        return None, None
    if store is not None:
        try:
            summaries = store.gather()
            parts = [store.read(*c, name="draws") for c in keep_chunks]
        finally:
            store.close()  # results are in memory: another process may use the directory now
    else:
        summaries = concat_chunks([memory[c][0] for c in grid])
        parts = [memory[c][1] for c in keep_chunks]
    return summaries, (concat_chunks(parts) if parts else None)


def concat_chunks(parts):
    import jax

    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts) if len(parts) > 1 else parts[0]


def kept_problems(bs: BeliefSet, keep_draws) -> np.ndarray:
    """Sorted flat problem indices ``checkpoint * T + token`` of the tokens ``keep_draws`` names."""
    if keep_draws is None or (not isinstance(keep_draws, str) and len(keep_draws) == 0):
        return np.zeros(0, np.int64)
    if isinstance(keep_draws, str) and keep_draws == "all":
        tokens = np.arange(bs.num_tokens)
    else:
        selectors = [keep_draws] if isinstance(keep_draws, (str, int)) else list(keep_draws)
        labels = {str(t): i for i, t in enumerate(bs.tokens)}
        missing = [t for t in selectors if str(t) not in labels]
        if missing:
            first = ", ".join(map(str, list(bs.tokens[:3])))
            raise InputError(
                f"field 'analysis.keep_draws': token {missing[0]!r} is not in the beliefs "
                f"(token labels are {first}, ...; or use 'all')"
            )
        tokens = np.unique([labels[str(t)] for t in selectors])
    checkpoints = np.arange(bs.num_checkpoints)
    return np.sort((checkpoints[:, None] * bs.num_tokens + tokens[None, :]).reshape(-1))


def kept_inference_data(bs: BeliefSet, keep: np.ndarray, kept: dict, settings: dict, model_name: str):
    """Kept draws -> InferenceData: posterior and sample_stats with dims (chain, draw, checkpoint, token)."""
    import arviz as az

    tokens = np.unique(keep % bs.num_tokens)
    C, K = bs.num_checkpoints, tokens.size
    order = np.argsort(kept["index"])
    assert np.array_equal(kept["index"][order], keep), "kept draws do not match the requested tokens"

    def grid(arr):  # [C*K, chain, draw, ...] -> [chain, draw, C, K, ...]
        arr = np.asarray(arr)[order].reshape((C, K) + arr.shape[1:])
        return np.moveaxis(np.moveaxis(arr, 2, 0), 3, 1)

    posterior = {k: grid(v) for k, v in kept["values"].items()}
    dims = {k: ["checkpoint", "token"] + [f"{k}_dim_{i}" for i in range(v.ndim - 4)] for k, v in posterior.items()}
    stats = {k: grid(v) for k, v in kept["stats"].items()}
    stats["diverging"] = stats["diverging"].astype(bool)
    dims.update({k: ["checkpoint", "token"] for k in stats})
    coords = {"checkpoint": np.asarray(bs.checkpoints), "token": np.asarray(bs.tokens)[tokens]}
    attrs = {"model": model_name, **{f"engine_{k}": str(v) for k, v in settings.items()}}
    return az.from_dict(posterior=posterior, sample_stats=stats, coords=coords, dims=dims,
                        posterior_attrs=attrs)


def host_summaries(kernel, pm_model, model_data, full_data, summary_fn, config, progress):
    """A host kernel (the ``pm.sample`` loop) over every problem, then the same on-device
    summaries of its draws as the batched kernels' chunks produce."""
    import jax

    s = config.sampler
    draws, stats = kernel.host_loop(
        pm_model, model_data, chains=s.chains, draws=s.draws, tune=s.tune,
        seed=config.seed, settings=s.kernel_settings, progress=progress,
    )
    arrays = full_data.device_arrays()
    with jax.enable_x64(config.runtime.precision == "float64"):
        fn = jax.jit(jax.vmap(summary_fn))
        out = jax.tree.map(np.asarray, fn({"theta": draws["theta"]}, stats, arrays))
        out["num_draws"] = np.full(draws["theta"].shape[0], int(s.draws), np.int64)  # gradients not counted
        return out


def chunk_size(num_problems: int, chains: int, draws: int, dim: int, num_q_draws: int, batch_size, *,
               num_devices: int = 1, platform: str = "cpu"):
    """``batch_size``, or when None :func:`engine.sampling.chunking.auto_batch_size`: the fewest
    equal chunks within the memory budget (``CHUNK_MEMORY_BYTES``) and, on CPU, a few hundred
    problems per device.

    Draws never leave the device, but inside a chunk's program every problem's
    ``[chain, draw, dim]`` values and seven ``[chain, draw]`` statistics exist at once, and so do
    its ``num_q_draws`` draws from q (with two log densities each), so 10^5 tokens in one chunk
    would need tens of GB.
    """
    if batch_size is not None:
        return int(batch_size)
    from engine.sampling.chunking import auto_batch_size

    return auto_batch_size(num_problems, chains=chains, draws=draws, values_per_draw=dim,
                           num_devices=num_devices, platform=platform, extra_bytes=8 * num_q_draws * (dim + 2))
