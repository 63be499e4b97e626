"""The README's Python examples run, at reduced size, as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"

REDUCE = {
    "size=(10_000, 20)": "size=(12, 20)",
    "size=10_000": "size=12",
    "chains=4, draws=1000, seed=0)": "chains=2, draws=100, tune=100, seed=0, progress=False)",
    '{"x": xs, "y": ys})': '{"x": xs, "y": ys}, chains=2, draws=100, tune=100, progress=False)',
    "num_simulations=1000": "num_simulations=16",
    "draws=400, tune=400, seed=0, out_dir=\"sbc_out\")": "draws=100, tune=100, seed=0, out_dir=SBC_OUT)",
    ", 200, simulator=": ", 16, chains=2, draws=100, tune=100, simulator=",
}
"""Smaller problems and runs than the README shows (every key must still be found in it)."""


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = _python_blocks()
    usage = [b for b in blocks if "KERNEL = Kernel(" not in b]
    kernels = [b for b in blocks if "KERNEL = Kernel(" in b]
    assert len(usage) == 3 and len(kernels) == 1, "README examples changed: update this test"
    code = "\n".join(usage)
    for old, new in REDUCE.items():
        assert old in code, f"README no longer contains {old!r}"
        code = code.replace(old, new)
    namespace: dict = {"SBC_OUT": str(tmp_path / "sbc_out")}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["idata"].posterior.slope.dims == ("chain", "draw", "problem")
    assert "theta[0]" in namespace["result"].summary["parameters"]

    # "Adding a sampler": the module as written, plus its one registry line
    (tmp_path / "readme_rwm.py").write_text(kernels[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    from engine.sampling import kernels as registry

    monkeypatch.setitem(registry.REGISTRY, "rwm", "readme_rwm")
    import engine
    from tests.models import normal_normal_data, normal_normal_model, normal_normal_posterior

    data = normal_normal_data(3, seed=2)
    idata = engine.sample_batched(normal_normal_model(), data, sampler="rwm", initial_step_size=0.3,
                                  chains=4, draws=1500, tune=200, progress=False)
    import arviz as az

    mean, _ = normal_normal_posterior(data)
    mcse = az.mcse(idata).theta.values
    z = (idata.posterior.theta.mean(("chain", "draw")).values - mean) / mcse
    assert np.all(np.abs(z) < 4.5), z
    sys.modules.pop("readme_rwm", None)


def test_layout_lists_every_module():
    """The README's Layout names every engine module (analyses as one folder) with its job."""
    text = README.read_text()
    layout = text[text.index("## Layout"):text.index("## Tests")]
    root = README.parent
    modules = [p.relative_to(root).as_posix() for p in (root / "engine").rglob("*.py")
               if "analyses" not in p.parts or p.name == "vfe_audit.py"]
    described_packages = ("engine/__init__.py", "engine/sampling/kernels/__init__.py")  # the others: docstrings only
    missing = [m for m in modules if m not in layout and (not m.endswith("__init__.py") or m in described_packages)]
    assert not missing, missing
