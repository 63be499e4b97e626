"""``python -m engine``: the Hydra app (config groups analysis, sampler, data, runtime, model)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from engine.run import run_cli

    code = run_cli(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
