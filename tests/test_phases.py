"""Where a run's seconds go (#37): each stage's manifest splits its seconds into start-up,
work and shutdown; a run that ran nothing leaves the report alone; the step-0 eval is
``eval_on_start``; a local Ray cluster the run started is gone when it ends."""

import json
import re
import time
from pathlib import Path

import psutil
import pytest

from helpers import run_cli, tiny_config, write_config
from pipeline import runner
from pipeline.core.config import config_from_dict, to_dict
from pipeline.core.phases import PhaseClock, phases_line
from pipeline.core.rundir import read_manifest
from pipeline.demo import make_pairs, write_jsonl
from pipeline.training.metrics import read_metrics


def test_phases_are_the_differences_between_marks_and_sum_to_the_stage_seconds():
    clock = PhaseClock(started=100.0)
    clock.end("startup", 103.5)  # a worker's ready_at
    clock.end("work", 110.0)
    assert clock.seconds(111.25) == {"startup": 3.5, "work": 6.5, "shutdown": 1.25}
    # nothing marked: all work; start-up marked alone: the rest is work
    assert PhaseClock(started=5.0).seconds(7.0) == {"startup": 0.0, "work": 2.0, "shutdown": 0.0}
    only = PhaseClock(started=0.0)
    only.end("startup", 1.0)
    assert only.seconds(4.0) == {"startup": 1.0, "work": 3.0, "shutdown": 0.0}
    # another node's clock: a mark before the start or after the end is held inside the stage
    skewed = PhaseClock(started=50.0)
    skewed.end("startup", 49.0)
    skewed.end("work", 60.0)
    assert skewed.seconds(58.0) == {"startup": 0.0, "work": 8.0, "shutdown": 0.0}
    with pytest.raises(ValueError, match="phase 'warmup'"):
        skewed.end("warmup")
    assert phases_line("score", {"startup": 5.04, "work": 0.8, "shutdown": 0.0}) == \
        "score: start-up 5.0 s, work 0.8 s, shutdown 0.0 s"


@pytest.fixture()
def small(assets, tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(300, seed=2), data)
    return tiny_config(assets, tmp_path / "run", data_file=data, tokenize={"max_tokens_per_row": 256,
                                                                          "rows_per_shard": 4})


def test_each_manifest_splits_its_seconds_into_phases_and_the_summary_shows_them(small):
    results = runner.run_pipeline(small, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    for name in ("tokenize", "score"):
        manifest = read_manifest(Path(results[name]["dir"]))
        phases = manifest["phases"]
        assert list(phases) == ["startup", "work", "shutdown"]
        assert sum(phases.values()) == pytest.approx(manifest["seconds"], abs=0.005)
        assert phases["startup"] > 0 and phases["work"] > 0, (name, phases)  # tokenizer / model loaded, then rows
    summary = runner.format_summary(results)
    assert re.search(r"^phases: tokenize: start-up \d+\.\d s, work \d+\.\d s, shutdown \d+\.\d s; score: start-up ",
                     summary, re.M), summary


def test_a_run_that_ran_nothing_leaves_the_report_of_the_same_outputs_alone(small):
    runner.run_pipeline(small, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    report = Path(small.run_dir) / "report"
    drawn = {p.name: p.stat().st_mtime_ns for p in report.iterdir()}
    time.sleep(0.01)
    again = runner.run_pipeline(small, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    assert not any(r["ran"] for r in again.values())
    assert {p.name: p.stat().st_mtime_ns for p in report.iterdir()} == drawn  # not drawn again
    # a stage run again (--force): its output is committed anew, and the report drawn again
    runner.run_pipeline(small, stages=["score"], force=True, use_ray=False, log=lambda _: None)
    redrawn = {p.name: p.stat().st_mtime_ns for p in report.iterdir()}
    assert redrawn["report.md"] > drawn["report.md"] and redrawn["reference_logps.png"] > drawn["reference_logps.png"]
    # other outputs (here: tokenize alone) are another report, drawn though nothing ran
    runner.run_pipeline(small, stages=["tokenize"], use_ray=False, log=lambda _: None)
    assert (report / "report.md").stat().st_mtime_ns > drawn["report.md"]
    assert "## score" not in (report / "report.md").read_text()
    assert json.loads((report / "_MADE_FROM.json").read_text())["outputs"].keys() == {"tokenize"}


def test_eval_on_start_is_in_the_fingerprint_only_when_turned_off(small):
    def fp(stage, **settings):
        raw = to_dict(small)
        raw["sft"]["enabled"] = True
        raw[stage].update(settings)
        return runner.plan_stages(config_from_dict(raw))[stage].fingerprint

    # on by default, and on is the behaviour of the runs made before the setting: their fingerprint
    for stage in ("train", "sft"):
        assert fp(stage) == fp(stage, eval_on_start=True) != fp(stage, eval_on_start=False), stage


@pytest.mark.slow  # DeepSpeed starts numactl
def test_eval_on_start_false_skips_the_step0_eval_and_trains_the_same(assets, tmp_path):
    import gc

    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(300, seed=2), data)
    records = {}
    for on in (True, False):
        cfg = tiny_config(assets, tmp_path / f"run-{on}", data_file=data, tokenize={"max_tokens_per_row": 256},
                          train={"max_steps": 3, "eval_steps": 2, "num_workers": 1, "eval_on_start": on})
        results = runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
        records[on] = read_metrics(Path(results["train"]["dir"]))
        assert gc.get_freeze_count() == 0  # the rank ran in this process: its engine can still be freed
        # the stats' step-0 eval loss is step 0's, or none: not the first eval after it
        assert results["train"]["stats"]["eval_step0_loss"] == (records[on][0]["eval_loss"] if on else None)
        phases = read_manifest(Path(results["train"]["dir"]))["phases"]
        assert phases["startup"] > 0 and phases["work"] > 0, phases  # the rank's engine, then the steps
    assert [r["step"] for r in records[True] if "eval_loss" in r] == [0, 2, 3]
    assert [r["step"] for r in records[False] if "eval_loss" in r] == [2, 3]
    # the same steps: an eval changes nothing of the training
    assert [(r["step"], r["loss"]) for r in records[False] if "loss" in r] == \
        [(r["step"], r["loss"]) for r in records[True] if "loss" in r]
    assert [r["eval_loss"] for r in records[False] if "eval_loss" in r] == \
        [r["eval_loss"] for r in records[True] if "eval_loss" in r][1:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_no_process_of_the_local_cluster_a_run_started_outlives_it(small, tmp_path):
    """``python -m pipeline run`` on Ray with no address starts a private cluster; when the
    run ends, no process of it is left (its GCS port is in every one's command line). The
    phases on Ray: start-up until the first actor had its tokenizer or model loaded; score's
    actors are tokenize's, kept warm."""
    config = write_config(small, tmp_path / "run.yaml")
    proc = run_cli(config, "--stages", "tokenize,score", ray=True, timeout=240)
    started = re.search(r"^\[ray\] started a local cluster at \S+:(\d+)$", proc.stdout, re.M)
    assert started, proc.stdout[-2000:]
    port = f":{started.group(1)}"
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
            if any(port in part for part in (p.info["cmdline"] or []))]
    assert not left, left
    assert re.search(r"^\[run\] \d+\.\d s: \d+\.\d s before the first stage \(imports, checks, fingerprints; "
                     r"waiting for Ray \d+\.\d s\), \d+\.\d s in the stages", proc.stdout, re.M), proc.stdout[-2000:]
    phases = {stage: read_manifest(next(Path(small.run_dir).glob(f"{stage}/*")))["phases"]
              for stage in ("tokenize", "score")}
    assert phases["tokenize"]["startup"] > 0.5 and phases["tokenize"]["work"] > 0, phases  # new actors' imports
    # score's first actor is tokenize's (one read unit), warm (cluster.workers): its start-up is the model's load
    assert "[score] 16 items on 2 actors (0.5 CPU each; 1 warm from an earlier stage)" in proc.stdout, proc.stdout
    assert 0 < phases["score"]["startup"] < phases["tokenize"]["startup"] and phases["score"]["work"] > 0, phases


def test_the_run_line_names_ray_only_for_a_run_on_ray():
    from pipeline.core.phases import run_line

    now = time.time()
    alone = run_line(now - 10.0, [now - 8.0, now - 1.0], 7.0, None)  # --no-ray
    assert re.fullmatch(r"\[run\] 10\.0 s: 2\.0 s before the first stage \(imports, checks, fingerprints\), "
                        r"7\.0 s in the stages, 0\.0 s between them, 1\.0 s after them \(the report\)", alone), alone
    on_ray = run_line(now - 10.0, [now - 8.0, now - 1.0], 7.0, 1.5)
    assert "(imports, checks, fingerprints; waiting for Ray 1.5 s)" in on_ray and "(the report; Ray's stop)" in on_ray
    assert run_line(now - 3.0, [], 0.0, None) == "[run] 3.0 s, no stage to run"


def test_the_process_start_is_the_kernels_to_the_clock_tick():
    from pipeline.core.phases import process_started

    # psutil adds the boot time in whole seconds: within 1 s of it, and in the past
    assert abs(process_started() - psutil.Process().create_time()) < 1.0
    assert process_started() < time.time()


def test_a_training_stage_phases_start_at_its_first_engine_and_end_at_the_export(tmp_path):
    from pipeline.training.launch import mark_phases
    from pipeline.training.loop import PHASES_FILE

    # the stage started at 100; its first attempt's engine was ready at 104 and the attempt
    # failed; the second's was ready at 130 and exported at 160
    (tmp_path / PHASES_FILE).write_text(json.dumps({"startup": [104.0, 130.0], "work": [160.0]}))
    clock = PhaseClock(started=100.0)
    mark_phases(clock, tmp_path)
    assert clock.seconds(161.0) == {"startup": 4.0, "work": 56.0, "shutdown": 1.0}  # the failed attempt is work
    # the first format (one time a phase) reads too
    (tmp_path / PHASES_FILE).write_text(json.dumps({"startup": 104.0, "work": 160.0}))
    old = PhaseClock(started=100.0)
    mark_phases(old, tmp_path)
    assert old.seconds(161.0) == {"startup": 4.0, "work": 56.0, "shutdown": 1.0}


def test_a_driver_that_runs_stages_in_its_own_process_freezes_nothing(small):
    """Workers take their start-up out of the collector's view (placement.settle), but a
    driver running the stages itself (--no-ray) must still free one stage's engine before
    the next: gc.collect skips frozen objects."""
    import gc

    runner.run_pipeline(small, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    assert gc.get_freeze_count() == 0


def test_the_report_drawn_beside_the_clusters_stop_says_what_it_drew_and_raises_what_failed(tmp_path, monkeypatch):
    """The runner draws the report in a thread while it stops the local cluster: the line it
    logs is the report's path, and an error in drawing is raised in the runner's thread (a
    run never ends without its report and without saying why)."""
    from pipeline import report

    logged = []
    monkeypatch.setattr(report, "write_report", lambda run_dir, results: f"{run_dir}/report/report.md")
    report.report_aside(tmp_path, {"train": {}}, logged.append)()
    assert logged == [f"[report] {tmp_path}/report/report.md"]

    def broken(run_dir, results):
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_report", broken)
    wait = report.report_aside(tmp_path, {"train": {}}, logged.append)
    with pytest.raises(OSError, match="disk full"):
        wait()
    report.report_aside(tmp_path, {}, logged.append)()  # nothing ran or was skipped: nothing drawn
    assert len(logged) == 1
