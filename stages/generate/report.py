"""generate's section of the run report: a few prompts side by side (policy | reference |
chosen), the lengths, the win rates, and a plot of reward against length for both models."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.storage import Loc


def _cell(text: str | None, limit: int = 300) -> str:
    """Text for one Markdown table cell: one line, pipes escaped, long answers cut."""
    if text is None:
        return "-"
    one = " ".join(text.split()).replace("|", "\\|")
    return one if len(one) <= limit else one[:limit] + " ..."


def _plot(path: Loc, table) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for side in ("policy", "reference"):
        ax.scatter(table.column(f"{side}_tokens").to_numpy(), table.column(f"{side}_reward").to_numpy(
            zero_copy_only=False), s=10, alpha=0.6, label=side)
    ax.set_title("reward against length")
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.write_bytes(buf.getvalue())
    plt.close(fig)


def section(folder: Loc, result: dict) -> list[str]:
    s = result["stats"]
    show = s.get("show", 5)
    files = Loc(result["dir"]).glob("samples-*.parquet")  # in name order
    tables = []
    for f in files:
        with f.open_input() as fh:
            tables.append(pq.read_table(fh))
    t = pa.concat_tables(tables)
    lengths = s["mean_tokens"]
    lines = ["", "## generate", "",
             f"- {s['prompts']} prompts x {s['samples'] // s['prompts']} samples; mean completion tokens: policy "
             f"{lengths['policy']:.1f}, reference {lengths['reference']:.1f}"
             + (f", chosen {lengths['chosen']:.1f}" if lengths.get("chosen") is not None else "")]
    for name, r in (s.get("win_rates") or {}).items():
        lines.append(f"- policy win rate against the {name.split('_vs_')[1]}: {r['win_rate']:.3f} "
                     f"(95% Wilson interval {r['ci95'][0]:.3f} to {r['ci95'][1]:.3f}, {r['prompts']} prompts, "
                     "ties count half)")
    if s.get("mean_reward"):
        m = s["mean_reward"]
        lines.append(f"- mean reward: policy {m['policy']:.4f}, reference {m['reference']:.4f}"
                     + (f", chosen {m['chosen']:.4f}" if m.get("chosen") is not None else "")
                     + " (longer answers often score higher: read the rates with the lengths)")
        _plot(folder / "generate_rewards.png", t)
        lines += ["", "![reward against length](generate_rewards.png)"]
    first = t.filter(pa.compute.equal(t.column("sample"), 0)).slice(0, show).to_pylist()
    if first:
        lines += ["", "| prompt | policy | reference | chosen |", "|---|---|---|---|"]
        lines += [f"| {_cell(r['prompt'])} | {_cell(r['policy'])} | {_cell(r['reference'])} | {_cell(r['chosen'])} |"
                  for r in first]
    return lines
