"""Fixtures shared by the test modules; a module opts in with `pytestmark = pytest.mark.usefixtures(...)`."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids thread start-up costs and oversubscribed CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64_default():
    """float64 as the default dtype for one test, restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A real single-node SLURM cluster (tests/slurm_cluster.py) for the module's tests, `SLURM_CONF` set for them
    and every job; skips with the reason where SLURM, munge, root or submitit is missing."""
    import os

    from slurm_cluster import SlurmCluster

    reason = SlurmCluster.unavailable()
    if reason is not None:
        pytest.skip(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()
