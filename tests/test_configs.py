"""Every option of every config group composes, and the runtime/sampler plumbing reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from hydra import compose, initialize_config_dir

from engine.cli import sampling_kwargs

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("analysis", "sampler", "data", "runtime", "model")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group):
    options = _options(group)
    assert options, group
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for option in options:
            cfg = compose("config", overrides=[f"{group}={option}"])
            chosen = OmegaConf.load(CONF / group / f"{option}.yaml")
            for key, value in chosen.items():  # the option's own values, not just any node
                if key != "defaults" and not OmegaConf.is_interpolation(chosen, key):
                    assert cfg[group][key] == value, (group, option, key)
            if group == "analysis":
                assert cfg.analysis.name == option


def test_sampling_kwargs_for_each_sampler_and_runtime():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for sampler in _options("sampler"):
            for runtime in _options("runtime"):
                cfg = compose("config", overrides=[f"sampler={sampler}", f"runtime={runtime}", "runtime.devices=2"])
                kw = sampling_kwargs(cfg)
                assert kw["sampler"] == cfg.sampler.name
                own_tune = cfg.sampler.name in ("auto", "chees")  # tune: null, each kernel's own warmup
                assert kw["chains"] == 4 and kw["draws"] == 1000 and kw["tune"] == (None if own_tune else 1000)
                if cfg.sampler.name != "pymc":
                    assert kw["precision"] == cfg.runtime.precision and kw["devices"] == 2
