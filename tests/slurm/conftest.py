"""Fixtures for tests against a real one-node SLURM cluster (tests/cluster/testcluster.py).

``slurm_cluster`` (session): starts the cluster in its own /tmp dir, points ``SLURM_CONF`` at it and
``KDEXP_SITE_DIR`` at tests/cluster (its launcher configs slurm_local*, reached as a user reaches a
site's), both in os.environ (jobs and submitit inherit it), yields its ClusterInfo, and stops exactly
what it started.
It skips when not root or the binaries are missing; with ``KDEXP_REQUIRE_SLURM=1`` (set by CI,
which installs the packages) that skip is a failure instead, so CI cannot silently test nothing.

``slurm_clean`` (function): cancels whatever jobs a test left behind. Opt in per module with
``pytestmark = pytest.mark.usefixtures("slurm_clean")``.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from cluster import testcluster  # tests/ is on sys.path (pyproject: pythonpath)


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
    try:
        info = testcluster.start(cluster_dir)
    except BaseException:
        testcluster.stop(cluster_dir)  # the ClusterError already carries the daemon log tails
        raise
    with pytest.MonkeyPatch.context() as env:  # restored when the session ends
        env.setenv("SLURM_CONF", str(info.slurm_conf))
        env.setenv("KDEXP_SITE_DIR", str(testcluster.SITE_DIR))
        try:
            yield info
        finally:
            testcluster.stop(cluster_dir)


@pytest.fixture
def slurm_clean(slurm_cluster: testcluster.ClusterInfo) -> Iterator[testcluster.ClusterInfo]:
    yield slurm_cluster
    testcluster.cancel_all_jobs(slurm_cluster)
