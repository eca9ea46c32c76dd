"""Command-line tools beside the master and worker: ``report`` (plots and tables of a run) and
``control`` (change a running worker's knobs)."""
