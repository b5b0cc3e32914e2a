"""`fastmid ablate`: arms, protocol (learning-rate selection, seeds), statistics, report.

Modules: :mod:`~fastmid.ablate.defaults` (the defaults, importable without torch),
:mod:`~fastmid.ablate.arms` (which layers each arm trains, and how), :mod:`~fastmid.ablate.data`
(the validation split carved from the training data; the test-set check),
:mod:`~fastmid.ablate.protocol` (the runs, resume, rate selection; :func:`run_ablation
<fastmid.ablate.protocol.run_ablation>`), :mod:`~fastmid.ablate.stats` (bootstrap intervals, the
paired bootstrap test, Holm's correction) and :mod:`~fastmid.ablate.report` (ablate.json, .csv,
.png and the console table). Nothing is imported here, so ``import fastmid.ablate`` stays cheap.
"""
