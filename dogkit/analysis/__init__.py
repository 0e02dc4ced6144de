"""What the runs mean: metrics, statistics, plots, the comparison report and the whole study in one command.

``metrics`` computes accuracy, top-5 and precision/recall/F1 with scikit-learn, ``stats`` the intervals and
tests, ``plots`` the figures, ``evaluate`` is ``dogkit eval``, ``report`` compares the regimes, and ``study``
runs prepare → train ×3 → export → eval → bench → report.
"""
