"""Command-line tools beside the master and worker: ``report`` (plots and tables of a run),
``control`` (change a running worker's knobs) and ``tls`` (a certificate for the master)."""
