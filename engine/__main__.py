"""``python -m engine``: the Hydra app (config groups analysis, sampler, data, runtime, model).

A config that does not fit the settings schema (``engine.settings``: a misspelt key such as
``sampler.drawz=10``, a value of the wrong type such as ``sampler.draws=many``, an unknown
option of a group) exits with status 2 and one line naming the key, as other bad input does.
"""

from __future__ import annotations

import os
import re
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _app(cfg: DictConfig) -> None:
    from engine.cli import run_cli

    code = run_cli(cfg)
    if code:
        sys.exit(code)


def config_error_line(err: BaseException) -> str | None:
    """One line for a config that does not compose (``None``: not a config error)."""
    from hydra.errors import ConfigCompositionException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(err, (ConfigCompositionException, OverrideParseException, OmegaConfBaseException)):
        return None
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    key = getattr(cause, "full_key", None)
    one_line = lambda text: re.sub(r"\s+", " ", text).strip()  # noqa: E731
    if key:
        return f"error: config key '{key}': {one_line(str(cause).split('full_key:')[0])}"
    return f"error: {one_line(str(err).split('Config search path')[0])}"


def main() -> None:
    """Run the Hydra app; config errors -> one line on stderr and status 2."""
    user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's exit(1)
    try:
        _app()
    except Exception as err:  # noqa: BLE001 - sorted below
        line = config_error_line(err)
        if line is not None and not user_full_error:
            print(line, file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
