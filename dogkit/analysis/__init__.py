"""What the runs mean: statistics, plots, evaluation and the comparison report (metrics are ``dogkit.metrics``,
shared with training; the whole study in one command is ``dogkit.study``, above this job).

- ``stats``: bootstrap intervals, McNemar's test, paired differences
- ``explained``: a run's model on test: calibration, localisation against the boxes, the gallery of its mistakes
- ``plots``: the figures, written as PNGs
- ``evaluate``: ``dogkit eval``, a model's metrics, per-class report and confusion matrix
- ``report``: ``dogkit report``, the regimes compared
"""
