"""The run report: ``<run_dir>/report/report.md`` with per-stage figures and PNG plots
(loss, reward accuracy, margins, the reference log-prob histogram), written at the end of
every ``run`` from the manifests and ``metrics.jsonl``, so it always describes what is on
disk."""

from __future__ import annotations

import io
import json
import threading
from typing import Callable

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.redaction import redact_text
from pipeline.core.rundir import read_manifest
from pipeline.core.storage import Loc


def _save(fig, path: Loc) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.write_bytes(buf.getvalue())


def _plot_lines(path: Loc, title: str, series: dict[str, tuple[list, list]], ylabel: str,
                marks: tuple[list, str] | None = None) -> None:
    """``marks``: steps drawn as dashed vertical lines, and their legend label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for label, (x, y) in series.items():
        if x:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
    if marks and marks[0]:
        for i, step in enumerate(marks[0]):
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8, label=marks[1] if i == 0 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _plot_histogram(path: Loc, values: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.hist(values, bins=60, color="tab:blue")
    ax.set_title(title)
    ax.set_xlabel("log-prob per completion token")
    ax.set_ylabel("tokens")
    ax.set_yscale("log")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _series(records: list[dict], key: str) -> tuple[list, list]:
    rows = [r for r in records if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def reference_logps(score_dir: Loc, limit: int = 2_000_000) -> np.ndarray:
    """Per-token reference log-probs at completion positions (a sample of at most ``limit``)."""
    values = []
    for shard in score_dir.glob("*-0*.parquet"):
        with shard.open_input() as f:
            flat = pc.list_flatten(pq.read_table(f, columns=["ref_logps"]).column(0)).to_numpy()
        values.append(flat[flat != 0])  # prompt positions hold 0
        if sum(len(v) for v in values) >= limit:
            break
    return np.concatenate(values)[:limit] if values else np.zeros(0)


def _metrics(result: dict) -> list[dict]:
    path = Loc(result["dir"]) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _sft_section(out: Loc, sft: dict) -> list[str]:
    """The SFT reference: its loss, and what it did to the eval split's chosen completions."""
    records, s = _metrics(sft), sft["stats"]
    _plot_lines(out / "sft_loss.png", "sft loss (NLL per completion token)",
                {"train": _series(records, "loss"), "eval": _series(records, "eval_loss")}, "loss")
    logp, pack = s["eval_chosen_logp_per_token"], s["packing"]["train"]
    return ["", "## sft", "",
            f"- {s['steps']} steps, loss {s['step0_loss']:.4f} -> {s['final_loss']:.4f}; train: "
            f"{pack['sequences']} chosen sequences in {pack['rows']} rows, waste {pack['waste_fraction']:.2%}",
            ("- eval split, mean chosen log-prob per completion token: "
             + (f"{logp['base']:.4f} under the base model, " if logp["base"] is not None else "")
             + f"{logp['sft']:.4f} under the SFT model") if logp["sft"] is not None else
            "- no eval split (data.eval_fraction: 0), so no eval metrics",
            *([f"- its own data: {s['packing']['input_rows']} rows, {s['packing']['quarantined']} quarantined "
               f"({json.dumps(s['packing']['quarantine_reasons'])}), format {s['packing']['format']}"]
              if "quarantined" in s["packing"] else []),
            f"- SFT model (the reference and the policy's start): `{redact_text(s['export'])}`", "",
            "![sft loss](sft_loss.png)"]


MADE_FROM = "_MADE_FROM.json"  # the stage outputs the report describes: each one's directory and commit time
REPORT_VERSION = 1  # bumped when the report's content changes: a kept report is of this version


def write_report(run_dir: Loc, results: dict[str, dict]) -> Loc:
    """Markdown + PNGs under ``<run_dir>/report``; returns the Markdown's location. A run
    in which no stage ran, on the very outputs the report already describes (each stage's
    directory and manifest's ``finished_at``, and the report's version), keeps it: it
    describes them, as the run that made them (its table says "ran" where this one skipped)."""
    out = Loc(run_dir) / "report"
    made_from = {name: [r["dir"], (read_manifest(Loc(r["dir"])) or {}).get("finished_at")] for name, r in results.items()}
    made_from = {"version": REPORT_VERSION, "outputs": made_from}
    if not any(r["ran"] for r in results.values()) and (out / "report.md").is_file() and (out / MADE_FROM).is_file() \
            and json.loads((out / MADE_FROM).read_text()) == made_from:
        return out / "report.md"
    out.mkdir()
    lines = ["# Run report", "", "| stage | state | rows | tokens | seconds | output |", "|---|---|---:|---:|---:|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {'ran' if r['ran'] else 'skipped (done)'} | {r['rows']} | {r['tokens']} | "
                     f"{r['seconds']} | `{redact_text(r['dir'])}` |")
    tok = results.get("tokenize")
    if tok:
        s = tok["stats"]
        lines += ["", "## tokenize", "",
                  f"- input rows {s['input_rows']}, pairs {s['pairs']}, quarantined {s['quarantined']} "
                  f"({json.dumps(s['quarantine_reasons'])}), format {s.get('format')}, "
                  f"duplicate pairs {s.get('duplicate_pairs', 0)}, truncated pairs {s['truncated_pairs']} "
                  f"(prompt cut in {s.get('prompt_truncated_pairs', 0)})",
                  f"- train: {s['train']['pairs']} pairs in {s['train']['rows']} rows, waste "
                  f"{s['train']['waste_fraction']:.2%}; eval: {s['eval']['pairs']} pairs in {s['eval']['rows']} rows, "
                  f"waste {s['eval']['waste_fraction']:.2%}"]
        if s.get("sources"):
            lines += ["", "| source | rows | rows drawn | pairs | quarantined | format |", "|---|---:|---:|---:|---:|---|"]
            lines += [f"| {redact_text(name)} | {c['rows']} | {c['sampled_rows']} | {c['pairs']} | {c['quarantined']} | "
                      f"{c.get('format') or '-'} |" for name, c in s["sources"].items()]
    sft = results.get("sft")
    if sft:
        lines += _sft_section(out, sft)
    score = results.get("score")
    if score:
        values = reference_logps(Loc(score["dir"]))
        if values.size:
            _plot_histogram(out / "reference_logps.png", values, "reference log-probs (completion tokens)")
            st = score["stats"]
            subset = st.get("rows_scored", st["rows"]) < st["rows"]  # TR-DPO: the first segment and eval rows
            lines += ["", "## score", "",
                      f"- mean reference log-prob per completion token {st['mean_ref_logp_per_token']:.4f}"
                      + (f" (over the {st['rows_scored']} rows scored: TR-DPO's first segment and the eval rows; "
                         "the train ranks score the others)" if subset else ""),
                      "", "![reference log-probs](reference_logps.png)"]
    train = results.get("train")
    if train:
        records = _metrics(train)
        refreshes = train["stats"].get("reference_refreshes") or {}
        marks = (refreshes["steps"], "reference refreshed") if refreshes.get("steps") else None
        _plot_lines(out / "loss.png", "loss", {"train": _series(records, "loss"),
                                               "eval": _series(records, "eval_loss")}, "loss", marks)
        _plot_lines(out / "accuracy.png", "rewards/accuracies",
                    {"train": _series(records, "rewards/accuracies"),
                     "eval": _series(records, "eval_rewards/accuracies")}, "accuracy", marks)
        _plot_lines(out / "margins.png", "rewards/margins",
                    {"train": _series(records, "rewards/margins"),
                     "eval": _series(records, "eval_rewards/margins")}, "margin", marks)
        s = train["stats"]
        final = s.get("final_eval", {})
        lines += ["", "## train", "",
                  f"- {s['steps']} steps, step-0 loss {s['step0_loss']:.6f}, last loss {s['final_loss']:.6f}",
                  (f"- final eval: loss {final['eval_loss']:.4f}, rewards/accuracies "
                   f"{final['eval_rewards/accuracies']:.3f}, rewards/margins "
                   f"{final['eval_rewards/margins']:.4f}") if final else
                  "- no eval split (data.eval_fraction: 0), so no eval metrics",
                  f"- model: `{s['export']}`", "",
                  "![loss](loss.png)", "", "![accuracy](accuracy.png)", "", "![margins](margins.png)"]
        if marks:  # TR-DPO: the log-ratios restart at each refresh
            steps = refreshes["steps"]
            _plot_lines(out / "rewards.png", "rewards (beta x log-ratio to the reference)",
                        {"chosen": _series(records, "rewards/chosen"),
                         "rejected": _series(records, "rewards/rejected")}, "reward", marks)
            shown = ", ".join(map(str, steps[:10])) + (", ..." if len(steps) > 10 else "")
            lines += ["", f"- TR-DPO: the reference refreshed {len(steps)} times (steps {shown}), "
                          f"{refreshes['seconds']:.1f} s in all", "", "![rewards](rewards.png)"]
    from pipeline.registry import stage

    for name, result in results.items():  # the sections stages declare (Stage.report)
        lines += stage(name).report(out, result)
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    (out / MADE_FROM).write_text(json.dumps(made_from))
    return md


def report_aside(run_dir, results: dict, log) -> Callable[[], None]:
    """``write_report`` in a thread (files only, no Ray), while the runner's thread stops the
    local cluster (Ray's stop belongs in the thread that uses Ray); returns the wait for it,
    which raises what drawing raised. Nothing is drawn when no stage ran or was skipped."""
    failed: list[BaseException] = []

    def draw():
        try:
            log(f"[report] {write_report(run_dir, results)}")
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            failed.append(e)

    drawing = threading.Thread(target=draw, name="report")
    if results:
        drawing.start()

    def wait() -> None:
        if results:
            drawing.join()
        if failed:
            raise failed[0]

    return wait
