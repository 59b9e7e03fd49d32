"""The application on top of the library: the `auvcore` command and the run folder it works in.

Imports flow one way: ``cli`` -> ``scoring``, ``qc``, ``report``, ``check``; ``report`` -> ``filter``; all -> ``table``
-> ``run``.
  run.py      the run folder: atomic writes, settings, fingerprints, case files, failure records
  table.py    the AUV table assembled from the case files, and reading it back
  scoring.py  scoring one case and a whole data set (resumable)
  qc.py       `auvcore qc`: the out-of-fold label-error score (auvcore/qc.py) per fold, resumable
  filter.py   the quantile filter and nnU-Net splits
  check.py    `auvcore check`: every problem of a data set before scoring
  report.py   `auvcore report`: the HTML page
  cli.py      the `auvcore` command
"""
