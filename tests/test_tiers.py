"""The test tiers' guard (conftest.py): a test outside the slow tier cannot start a
subprocess or Ray."""

import subprocess

import pytest
import ray
from helpers import FastTierViolation


def test_a_fast_test_that_starts_a_subprocess_fails():
    with pytest.raises(FastTierViolation, match="test_tiers.py::test_a_fast_test_that_starts_a_subprocess_fails "
                                                "started a subprocess or Ray but is not marked slow"):
        subprocess.run(["true"])


def test_a_fast_test_that_starts_ray_fails():
    with pytest.raises(FastTierViolation, match="not marked slow"):
        ray.init(address="local", num_cpus=1)


@pytest.mark.slow
def test_a_slow_test_may_start_a_subprocess():
    assert subprocess.run(["true"]).returncode == 0
