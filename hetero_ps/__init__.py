"""hetero_ps: a parameter server for training one PyTorch model on unequal machines.

The master (``python -m hetero_ps.server``) owns the parameters and the optimizer; every node runs
``python -m hetero_ps.worker`` and trains on the share of the global batch the scheduler gives it.
"""

__version__ = "0.1.0"
