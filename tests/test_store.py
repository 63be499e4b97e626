"""Chunk store: atomic chunk files, resume, refusal of a changed configuration."""

from __future__ import annotations

import numpy as np
import pytest

from engine.sampling.batch import BatchConfig, chunk_grid, run_batched
from engine.sampling.api import compile_for
from engine.settings import RuntimeConfig, SamplerConfig
from engine.model.compile import prepare_data
from engine.sampling.diagnostics import summarize_draws
from engine.errors import InputError
from engine.audit.store import ChunkStore
from tests.models import normal_normal_data, normal_normal_model


def test_chunks_roundtrip_and_resume(tmp_path):
    grid = chunk_grid(10, 4)
    store = ChunkStore(tmp_path, {"a": 1}, grid)
    assert store.pending() == grid
    store.write(0, 4, {"x": np.arange(4.0), "nested": {"y": np.ones((4, 2))}})
    # a crash mid-write leaves only a temporary file, never a partial chunk file
    (tmp_path / "chunks" / ".chunk_0000000004_0000000008.npz.123.tmp").write_bytes(b"partial")
    again = ChunkStore(tmp_path, {"a": 1}, grid)
    assert again.completed() == [(0, 4)]
    assert again.pending() == [(4, 8), (8, 10)]
    got = again.read(0, 4)
    assert np.array_equal(got["x"], np.arange(4.0)) and got["nested"]["y"].shape == (4, 2)
    with pytest.raises(InputError, match="chunk 4:8 has no results"):
        again.gather()
    again.write(4, 8, {"x": np.arange(4.0, 8), "nested": {"y": np.ones((4, 2))}})
    again.write(8, 10, {"x": np.arange(8.0, 10), "nested": {"y": np.ones((2, 2))}})
    assert np.array_equal(again.gather()["x"], np.arange(10.0))


def test_changed_configuration_refused_unless_overwrite(tmp_path):
    grid = chunk_grid(4, 2)
    ChunkStore(tmp_path, {"seed": 0}, grid).write(0, 2, {"x": np.zeros(2)})
    with pytest.raises(InputError, match="different configuration"):
        ChunkStore(tmp_path, {"seed": 1}, grid)
    fresh = ChunkStore(tmp_path, {"seed": 1}, grid, overwrite=True)
    assert fresh.completed() == []


def test_wrong_chunk_length_rejected(tmp_path):
    store = ChunkStore(tmp_path, {}, chunk_grid(4, 2))
    with pytest.raises(ValueError, match="has shape"):
        store.write(0, 2, {"x": np.zeros(3)})


def _summary(values, stats, data):
    out = summarize_draws(values["theta"][None])
    return {k: v[0] for k, v in out.items()}


def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path):
    model = normal_normal_model()
    problem_data = prepare_data(model, normal_normal_data(9, seed=1))
    compiled = compile_for(model, problem_data)
    config = BatchConfig(sampler=SamplerConfig(chains=2, draws=100, tune=100), runtime=RuntimeConfig(batch_size=4),
                         keep_draws=False)
    full = run_batched(compiled, problem_data, config, summary_fn=_summary, progress=False)
    grid = chunk_grid(9, 4)
    store = ChunkStore(tmp_path, {"run": 1}, grid)
    # "interrupted": only the first chunk ran
    run_batched(
        compiled, problem_data, config, summary_fn=_summary, chunks=grid[:1], progress=False,
        on_chunk=lambda a, b, host: store.write(a, b, host[2]),
    )
    resumed = ChunkStore(tmp_path, {"run": 1}, grid)
    assert resumed.pending() == grid[1:]
    run_batched(
        compiled, problem_data, config, summary_fn=_summary, chunks=resumed.pending(),
        progress=False, on_chunk=lambda a, b, host: resumed.write(a, b, host[2]),
    )
    gathered = resumed.gather()
    for key, value in full.summaries.items():
        assert np.array_equal(gathered[key], value), key
