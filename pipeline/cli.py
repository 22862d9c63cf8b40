"""Command line: ``python -m pipeline`` / ``dpo-pipeline``.

  run CONFIG [key.sub=value ...] [--stages STAGE,...] [--from STAGE] [--force]
  status CONFIG [key.sub=value ...]
  plan CONFIG [key.sub=value ...] [--mfu F]   per-rank memory and FLOPs, before launch
  demo-assets [DIR]      build the demo's data, tokenizer and tiny model (deterministic)
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core.config import ConfigError, DataError, config_from_dict, read_config, unchecked


def _parser() -> argparse.ArgumentParser:
    from pipeline.registry import names

    stages = names()  # the registered stages, in order
    p = argparse.ArgumentParser(prog="dpo-pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline's stages (done ones are skipped)")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", help="key.sub=value")
    run.add_argument("--stages", help=f"comma-separated subset of {','.join(stages)}")
    run.add_argument("--from", dest="from_stage", help=f"run this stage ({', '.join(stages)}) and every later one")
    run.add_argument("--force", action="store_true", help="rerun the selected stages even if done")
    run.add_argument("--skip-memory-check", action="store_true",
                     help="run even where the plan's peak exceeds device.memory_gib (docs/plan.md)")
    run.add_argument("--no-ray", action="store_true",
                     help="run every stage's core in this process, one train rank (no Ray)")
    st = sub.add_parser("status", help="each stage's fingerprint and state")
    st.add_argument("config")
    st.add_argument("overrides", nargs="*")
    plan = sub.add_parser("plan", help="per-rank memory and FLOPs of each stage, before launch (no weights, no Ray)")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--mfu", type=float, default=0.4, help="the MFU the times are given at (default 0.4)")
    demo = sub.add_parser("demo-assets", help="build the demo's data, tokenizer and tiny model")
    demo.add_argument("dir", nargs="?", default="runs/tiny-assets")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after the options (run CONFIG --stages train a.b=1)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and args.command == "demo-assets"):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = args.overrides + extra
    try:
        if args.command == "demo-assets":
            from pipeline.demo import make_assets

            paths = make_assets(args.dir)
            print(f"demo data: {paths['data']}\ndemo model and tokenizer: {paths['model']}")
            return 0
        raw = read_config(args.config, args.overrides)
        if args.command == "run" and not (args.no_ray or args.stages or args.from_stage) and new_run_dir(raw):
            from cluster.ray_cluster import connect_early

            connect_early(unchecked(raw).cluster)  # beside the imports and checks below (cluster/ray_cluster.py)
        cfg = config_from_dict(raw)
        from pipeline import runner
        from pipeline.core.phases import process_started

        if args.command == "plan":
            from pipeline.planning import plan_text

            if not 0 < args.mfu <= 1:
                raise ConfigError(f"--mfu: {args.mfu} is not in (0, 1]")
            print(plan_text(plan_of(cfg, args.mfu), args.config), end="")
            return 0
        if args.command == "status":
            print(runner.format_table(
                runner.status(cfg),
                ["stage", "fingerprint", "state", "rows", "tokens", "seconds", "dir"]))
            return 0
        stages = args.stages.split(",") if args.stages else None
        results = runner.run_pipeline(cfg, stages=stages, from_stage=args.from_stage, force=args.force,
                                      use_ray=not args.no_ray, memory_check=not args.skip_memory_check,
                                      started=process_started())  # the [run] line counts the imports
        print(runner.format_summary(results))
        return 0
    except (ConfigError, DataError, FileNotFoundError) as e:  # a setting, a path or data to fix: which, no traceback
        print(f"error: {user_error(e)}", file=sys.stderr)
        return 2
    finally:  # a local cluster started early for a run its checks refused, or for one that failed
        if "cluster.ray_cluster" in sys.modules:
            try:
                sys.modules["cluster.ray_cluster"].stop_local()
            except Exception as e:  # noqa: BLE001 - the run's own outcome is what the user must see
                print(f"warning: stopping the local Ray cluster: {e!r}", file=sys.stderr)


def new_run_dir(raw: dict) -> bool:
    """Whether ``run`` (every stage: no --stages or --from) certainly starts a stage, so that
    Ray may start before the checks: its run directory is local and holds no stage's
    directory yet. (An unchanged rerun never starts Ray; any other run checks and
    fingerprints first, then starts it if a stage runs.)"""
    from pathlib import Path

    from pipeline.core.storage import is_uri
    from pipeline.registry import names

    try:
        run_dir = unchecked(raw).run_dir
    except ConfigError:  # the checks say it, next
        return False
    return not is_uri(run_dir) and not any((Path(run_dir).expanduser() / name).exists() for name in names())


def plan_of(cfg, mfu: float = 0.4):
    """``pipeline plan`` (pipeline/planning/). Where the stages before the first that loads a
    model (tokenize) are done in an existing local run directory on local data, their rows
    give the run's FLOPs; no model is pinned, and no weights are downloaded or hashed for it."""
    from pathlib import Path

    from pipeline import planning, runner
    from pipeline.core.models import kind_of
    from pipeline.core.rundir import stage_state
    from pipeline.core.storage import is_uri

    done = {}
    local = not is_uri(cfg.run_dir) and Path(cfg.run_dir).expanduser().is_dir() and kind_of(cfg.tokenizer_path) != "uri"
    if local and not cfg.data.sources and cfg.data.hf_dataset is None and not any(is_uri(f) for f in cfg.data.train_files):
        try:
            done = {n: p.dir.local for n, p in runner.plan_stages(cfg, weightless=True).items()
                    if p.dir.local and stage_state(p.dir) == "done"}
        except (ConfigError, DataError, OSError):  # data not there yet: planned without its rows
            pass
    return planning.make_plan(cfg, done, mfu)


def user_error(e: Exception) -> str:
    """The message of an error the user can fix. Raised in a Ray worker, Ray wraps it in a
    RayTaskError (a subclass of both) whose text holds the worker's traceback: the message
    is its cause's."""
    while isinstance(getattr(e, "cause", None), (ConfigError, DataError, FileNotFoundError)):
        e = e.cause
    return str(e)


def entry() -> int:
    """The ``dpo-pipeline`` command and ``python -m pipeline``: ``main``, then the process
    exits without the collector walking every object of torch first (``placement.settle``)."""
    code = main()
    from pipeline.core.placement import settle

    settle(exiting=True)
    return code


if __name__ == "__main__":
    sys.exit(entry())
