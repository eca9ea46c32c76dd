"""Tools for tests, ours and users': a fault-injecting TCP proxy and a loopback cluster of real processes."""

from hetero_ps.testing.fault_proxy import Fault, FaultProxy
from hetero_ps.testing.local_cluster import LocalCluster

__all__ = ["Fault", "FaultProxy", "LocalCluster"]
