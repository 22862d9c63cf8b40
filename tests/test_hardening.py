"""Failures that would come after hours of work, caught before any: run-directory placement
under Ray Jobs, trackers, secrets, remote code."""

import json

import pytest

from pipeline.core.config import ConfigError
from pipeline.runner import check_run_dir

RAY_JOB = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(
    {"runtime_env": {"working_dir": "gcs://_ray_pkg_3f2a.zip"}, "metadata": {}})}


def test_a_relative_run_dir_is_refused_under_ray_jobs():
    with pytest.raises(ConfigError, match=r"run_dir: 'runs/tiny' is relative, and under `ray job submit` it would "
                                          r"resolve inside Ray's temporary copy of the job's working directory "
                                          r"\(gcs://_ray_pkg_3f2a.zip\), which is deleted"):
        check_run_dir("runs/tiny", RAY_JOB)
    for fine in ("/mnt/shared/runs/tiny", "s3://bucket/runs/tiny", "file:///abs/runs"):
        check_run_dir(fine, RAY_JOB)
    check_run_dir("runs/tiny", {})  # not a Ray job: relative to where the user runs it
