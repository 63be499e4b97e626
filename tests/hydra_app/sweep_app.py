"""A tiny Hydra app for the sensitivity test: ``python sweep_app.py -m lr=...,... layers=...``.

Each job writes ``metrics.json`` (a deterministic perplexity of its hyperparameters plus seeded
noise, its log as ``loss`` and a constant step count) into its Hydra output directory, as a real training sweep would.
"""

import json
import math
import zlib
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

EFFECTS = {"log10_lr": -2.0, "layers": -0.5, "sgd": 1.5}
"""True per-unit effects on perplexity (``optimizer=sgd`` vs ``adam``)."""


@hydra.main(version_base="1.3", config_path=".", config_name="sweep_config")
def main(cfg: DictConfig) -> None:
    key = f"{cfg.lr}-{cfg.layers}-{cfg.optimizer}-{cfg.seed}"
    noise = ((zlib.crc32(key.encode()) % 10_000) / 10_000 - 0.5) * 0.4
    ppl = (20.0 + EFFECTS["log10_lr"] * math.log10(cfg.lr) + EFFECTS["layers"] * cfg.layers
           + EFFECTS["sgd"] * (cfg.optimizer == "sgd") + noise)
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "metrics.json").write_text(json.dumps({"perplexity": ppl, "loss": math.log(ppl),
                                                        "train": {"steps": 100}}))


if __name__ == "__main__":
    main()
