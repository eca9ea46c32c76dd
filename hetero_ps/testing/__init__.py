"""Tools for tests, ours and users': a fault-injecting TCP proxy, a loopback cluster of real processes, and
real rate-limited links (``netlinks``)."""

from hetero_ps.testing.fault_proxy import Fault, FaultProxy
from hetero_ps.testing.local_cluster import LocalCluster

__all__ = ["Fault", "FaultProxy", "LocalCluster"]
