"""A simulated multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`), for the integration tests."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def simulated_cluster(cpus_per_node: int, num_nodes: int = 2) -> Iterator[tuple]:
    """A head without CPUs (so work lands on the nodes) and `num_nodes` nodes; yields (cluster, nodes)."""
    from ray.cluster_utils import Cluster

    # Workers inherit these: one thread pool each, so several workers fit 2 cores.
    os.environ.update(OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=cpus_per_node) for _ in range(num_nodes)]
    c.wait_for_nodes()
    try:
        yield c, nodes
    finally:
        c.shutdown()
