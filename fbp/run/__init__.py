"""The experiment runner behind ``fbp train``, ``fbp eval``, ``fbp export`` and sweeps.

An experiment is a declarative ``Experiment`` in a file of ``experiments/``; the
runner plans a run from its options (``options``), builds what is trained
(``runner``), trains it in jitted chunks with exact resume (``loop``), and reports
(``report``). Sweeps of seeds and grids run as one vmapped program (``sweep``).
Host bookkeeping is split by job: ``metrics`` (metrics.jsonl, hashes, versions),
``rundir`` (the run directory and its lock), ``progress`` (progress lines and
signals); plots are drawn by ``fbp.figures``.
"""

from fbp.run.experiment import Experiment, RunResult

__all__ = ["Experiment", "RunResult"]
