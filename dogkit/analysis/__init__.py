"""What the runs mean: metrics, statistics, plots, the comparison report and the whole study in one command.

- ``metrics``: accuracy, top-5, precision/recall/F1 with scikit-learn
- ``stats``: bootstrap intervals, McNemar's test, calibration
- ``plots``: the figures, written as PNGs
- ``evaluate``: ``dogkit eval``, a model's metrics, per-class report and confusion matrix
- ``report``: ``dogkit report``, the regimes compared
- ``study``: ``dogkit study``, prepare → train ×3 → export → eval → bench → report
"""
