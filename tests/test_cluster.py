"""The cluster entry points: ray_cluster.yaml passes Ray's schema, and the pipeline runs
as a Ray job submitted to a real head started with `ray start` (loopback)."""

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import agent_ports, hub_cache, tiny_config
from pipeline.core.config import dump_yaml
from pipeline.training.engine import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ray_cluster_yaml_passes_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(raw)
    validate_config(prepare_config(copy.deepcopy(raw)))
    assert raw["available_node_types"]["worker.8xh100"]["resources"]["GPU"] == 8
    bad = dict(raw, available_node_type=raw["available_node_types"])  # a typo'd key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_the_cluster_installs_the_trackers_the_example_configs_report_to():
    """Otherwise rank 0 fails after tokenizing and scoring (the driver checks this too)."""
    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    used = {t for path in (REPO / "configs").glob("*.yaml")
            for t in (yaml.safe_load(path.read_text()).get("train") or {}).get("report_to", [])}
    assert "wandb" in used  # the 8B example reports to W&B
    assert any('pip install -e ".[tracking]"' in c for c in raw["setup_commands"]), raw["setup_commands"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_pipeline(assets, tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    temp = Path("/tmp") / f"rayjob{gcs}"  # ray's socket paths must stay short
    # --block: this head lives as long as the child process; stopping it stops only this
    # cluster (`ray stop` would kill every Ray process on the machine, the session's too).
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         "--object-store-memory=536870912", "--disable-usage-stats", f"--temp-dir={temp}", *agent_ports()],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while subprocess.run([str(BIN / "ray"), "job", "list", f"--address=http://127.0.0.1:{dash}"],
                             env=env, capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None and time.time() < deadline, "the Ray head did not come up"
            time.sleep(2)
        # the model named by Hub id, from the HF_HOME the job's environment names (offline,
        # as on a cluster without internet whose cache was filled beforehand)
        commit = hub_cache(tmp_path / "hf" / "hub", "dpo-pipeline/tiny", assets["model"])
        cfg = tiny_config(assets, tmp_path / "run", train={"max_steps": 4, "eval_steps": 100},
                          model={"path": "dpo-pipeline/tiny"})
        config = tmp_path / "job.yaml"
        config.write_text(dump_yaml(cfg))
        runtime_env = json.dumps({"env_vars": {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}})
        for _attempt in range(30):
            submit = subprocess.run(
                [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir",
                 str(REPO), f"--runtime-env-json={runtime_env}", "--", sys.executable, "-m", "pipeline", "run",
                 str(config)],
                env=env, capture_output=True, text=True, timeout=720)
            out = submit.stdout + submit.stderr
            # The dashboard answers before the node's job agent registers; no job was created.
            if "No available agent to submit job" not in out:
                break
            time.sleep(3)
        assert submit.returncode == 0, out[-4000:]
        assert "succeeded" in out
        connected = [line for line in out.splitlines() if line.startswith("[ray] ")]
        assert len(connected) == 1 and connected[0].startswith("[ray] connected to cluster at ")
        assert connected[0].endswith(f":{gcs}")  # joined the submitted-to head, started none
        # each progress line once (Ray Train's print patch showed every one twice)
        steps = [line.split("[train] ")[1] for line in out.splitlines() if "[train] step " in line]
        assert [s.split()[1] for s in steps] == ["1/4", "2/4", "3/4", "4/4"], steps
        manifests = sorted((tmp_path / "run").glob("*/*/_MANIFEST.json"))
        assert [m.parent.parent.name for m in manifests] == ["score", "tokenize", "train"]
        train = json.loads(manifests[2].read_text())
        assert train["stats"]["steps"] == 4
        assert abs(train["stats"]["step0_loss"] - 0.693147) < 1e-6
        assert train["models"]["model.path"] == {"name": "dpo-pipeline/tiny", "kind": "hub", "revision": "main",
                                                 "commit": commit, "pinned": f"dpo-pipeline/tiny@{commit}"}
        assert "dpo-pipeline/tiny" in (tmp_path / "run" / "config.yaml").read_text()  # as the user wrote it

        # configs/tiny.yaml's run_dir (runs/tiny) is relative: under the job it would land in
        # Ray's temporary copy of the working directory, so the job refuses it at once
        rel = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir",
             str(REPO), "--", sys.executable, "-m", "pipeline", "run", str(config), "run_dir=runs/tiny"],
            env=env, capture_output=True, text=True, timeout=300)
        out = rel.stdout + rel.stderr
        assert rel.returncode != 0 and "error: run_dir: 'runs/tiny' is relative" in out, out[-3000:]
        assert "[tokenize] running" not in out

        # data to fix ends the job in one line, FAILED, no traceback (a crash keeps one)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"a": [1], "b": 2}))
        failed = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir",
             str(REPO), f"--runtime-env-json={runtime_env}", "--", sys.executable, "-m", "pipeline", "run",
             str(config), f"data.train_files=[{bad}]"],
            env=env, capture_output=True, text=True, timeout=300)
        out = failed.stdout + failed.stderr
        assert failed.returncode != 0 and "failed with exit code 2" in out, out[-3000:]
        assert "error: data.train_files: " in out and "holds neither a JSON array of rows nor JSON Lines" in out
        assert "Traceback" not in out, out[-3000:]
    finally:
        head.terminate()
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)


def test_deepspeed_config_worked_values(assets, tmp_path):
    from cluster.deepspeed_config import build_ds_config

    cpu = tiny_config(assets, tmp_path, train={"gradient_accumulation_steps": 4, "max_grad_norm": 0.5})
    ds = build_ds_config(cpu.train, cpu.model.dtype, world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (1, 4, 8)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is False
    assert zero["memory_efficient_linear"] is False  # cluster/zero3_linear.py replaces it
    gpu = tiny_config(assets, tmp_path, train={"use_gpu": True})
    gpu.model.dtype = "bfloat16"
    ds = build_ds_config(gpu.train, gpu.model.dtype, world_size=8)
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["bf16"] == {"enabled": True}
