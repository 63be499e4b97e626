"""Auditing variational beliefs against their posteriors: ``beliefs`` and ``beliefs_files``
(input), ``vfe_models`` and ``references`` (templates and closed forms), ``vfe`` (``audit_vfe``,
the pipeline), ``chunks`` and ``store`` and ``progress`` (running the chunk grid durably),
``metrics`` (KL, W2, k-hat, the table), ``report`` (report.md, plots, summary.json), ``demo``."""
