"""Fixtures for tests against a real one-node SLURM cluster (launch/testcluster.py).

``slurm_cluster`` (session): starts the cluster in its own /tmp dir, points ``SLURM_CONF`` at it
(jobs and submitit inherit os.environ), yields its ClusterInfo, and stops exactly what it started.
It skips when not root or the binaries are missing; with ``KDEXP_REQUIRE_SLURM=1`` (set by CI,
which installs the packages) that skip is a failure instead, so CI cannot silently test nothing.

``slurm_clean`` (function): cancels whatever jobs a test left behind. Opt in per module with
``pytestmark = pytest.mark.usefixtures("slurm_clean")``.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from launch import testcluster  # the repo root is on sys.path (pyproject: pythonpath)


def _require() -> bool:
    return os.environ.get("KDEXP_REQUIRE_SLURM", "") not in ("", "0")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[testcluster.ClusterInfo]:
    reason = testcluster.unavailable_reason()
    if reason:
        if _require():
            pytest.fail(f"KDEXP_REQUIRE_SLURM is set but {reason}", pytrace=False)
        pytest.skip(reason)
    cluster_dir = testcluster.make_cluster_dir()
    old_conf = os.environ.get("SLURM_CONF")
    try:
        info = testcluster.start(cluster_dir)
    except BaseException:
        testcluster.stop(cluster_dir)  # the ClusterError already carries the daemon log tails
        raise
    os.environ["SLURM_CONF"] = str(info.slurm_conf)
    try:
        yield info
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        testcluster.stop(cluster_dir)


@pytest.fixture
def slurm_clean(slurm_cluster: testcluster.ClusterInfo) -> Iterator[testcluster.ClusterInfo]:
    yield slurm_cluster
    testcluster.cancel_all_jobs(slurm_cluster)
