"""The worker command: ``python -m hetero_ps.worker --master-addr HOST``."""
