"""Where a stage's seconds went: start-up, work and shutdown (``_MANIFEST.json``'s ``phases``).

A stage marks the moment each phase ended (``PhaseClock.end``): on the driver, or at a time
a worker recorded (a Ray actor ready to take work, a training rank's engine built). The
runner closes the last phase when the stage returns, so the phases sum to the manifest's
``seconds``. A stage that marks nothing spent all its seconds at work.

- start-up: from the stage's start until the first worker can take work (actors started,
  models loaded; for training the ranks' process group and engine);
- work: what the user asked for (rows tokenised, scored, trained, evaluated, exported);
- shutdown: what follows, until the stage commits (workers stopped, outputs listed).

Times are ``time.time()`` on each process's own clock: a worker on another node adds its
clock's offset, so each mark is held between the one before it and the stage's end.
"""

from __future__ import annotations

import os
import time

STARTUP, WORK, SHUTDOWN = "startup", "work", "shutdown"
PHASES = (STARTUP, WORK, SHUTDOWN)


class PhaseClock:
    def __init__(self, started: float | None = None):
        self.started = time.time() if started is None else started
        self.marks: list[tuple[str, float]] = []

    def end(self, phase: str, at: float | None = None) -> None:
        """``phase`` ended at ``at`` (now, by default): the next one starts there."""
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r}: not one of {PHASES}")
        self.marks.append((phase, time.time() if at is None else at))

    def seconds(self, finished: float) -> dict[str, float]:
        """Each phase's seconds, in order, summing to ``finished - started``: the time after
        the last mark is the phase after it (all work when nothing was marked)."""
        out = dict.fromkeys(PHASES, 0.0)
        t = self.started
        for phase, at in self.marks:
            at = min(max(at, t), finished)
            out[phase] += at - t
            t = at
        last = PHASES[min(PHASES.index(self.marks[-1][0]) + 1, len(PHASES) - 1)] if self.marks else WORK
        out[last] += finished - t
        return {k: round(v, 3) for k, v in out.items()}


def phases_line(name: str, phases: dict[str, float]) -> str:
    """``tokenize: start-up 5.1 s, work 3.2 s, shutdown 0.4 s`` (the run's summary)."""
    return f"{name}: " + ", ".join(f"{k.replace('startup', 'start-up')} {phases.get(k, 0.0):.1f} s" for k in PHASES)


def process_started() -> float:
    """When this process started (its time before ``run`` is imports), or now if unknown:
    its start in clock ticks since boot (/proc/self/stat's 22nd field) against the seconds
    since boot now (psutil's create_time adds the boot time in whole seconds: up to 1 s off)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        return time.time()


def run_line(started: float, ran: list[float], stages: float, ray_start: float | None) -> str:
    """The run's own seconds around its stages' (the summary's phases line has theirs).
    ``ran``: when the first stage that ran started and the last one ended (empty: none ran);
    ``stages``: their seconds; ``ray_start``: how long the driver waited for Ray's start (all
    of it, or what was left of one begun with the process: ``cluster.ray_cluster``), None
    for a run without Ray."""
    now = time.time()
    if not ran:
        return f"[run] {now - started:.1f} s, no stage to run"
    ray = ("", "") if ray_start is None else (f"; waiting for Ray {ray_start:.1f} s", "; Ray's stop")
    return (f"[run] {now - started:.1f} s: {ran[0] - started:.1f} s before the first stage (imports, checks, "
            f"fingerprints{ray[0]}), {stages:.1f} s in the stages, "
            f"{ran[1] - ran[0] - stages:.1f} s between them, {now - ran[1]:.1f} s after them (the report{ray[1]})")
