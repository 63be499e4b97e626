"""Analyses: one module per ``analysis=`` option, each ``run(cfg, run_dir) -> Result``."""
