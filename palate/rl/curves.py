"""curves.png: episode return and length against environment steps, drawn from metrics.jsonl.

The trainer draws it beside metrics.jsonl and the TensorBoard events at the end of every
``learn`` and, at most every :data:`REDRAW_EVERY_S` seconds, when it writes a checkpoint, so a
long run in progress or cut short has a picture of how far it got. Matplotlib's Agg
canvas, not pyplot: no display, no global state, safe in any thread.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from palate.runs import atomic_write

log = logging.getLogger(__name__)

FILENAME = "curves.png"

#: Least wall time between two drawings at checkpoints (a drawing costs ~0.1 s).
REDRAW_EVERY_S = 60.0


def read_series(metrics_path: Path, keys: tuple[str, ...]) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` for each key, from the records of metrics.jsonl that hold it."""
    series: dict[str, tuple[list[int], list[float]]] = {k: ([], []) for k in keys}
    if not metrics_path.exists():
        return series
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        for k in keys:
            if record.get(k) is not None:
                series[k][0].append(record["step"])
                series[k][1].append(record[k])
    return series


def write_curves(run_dir: str | Path, title: str = "") -> Path:
    """Draw ``run_dir/curves.png`` from ``run_dir/metrics.jsonl``; returns its path.

    Top: ``charts/episodic_return`` (mean return of the episodes finished since the previous
    record, true env reward) and, where present, ``eval/episodic_return``. Bottom:
    ``charts/episodic_length``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    s = read_series(run_dir / "metrics.jsonl",
                    ("charts/episodic_return", "eval/episodic_return", "charts/episodic_length"))
    fig = Figure(figsize=(7, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ret, length = fig.subplots(2, 1, sharex=True)
    ret.plot(*s["charts/episodic_return"], lw=1.2, label="training episodes")
    if s["eval/episodic_return"][0]:
        ret.plot(*s["eval/episodic_return"], "o-", ms=3, lw=1, label="evaluation (deterministic)")
    ret.set_ylabel("episode return")
    ret.legend(loc="best", fontsize=8)
    length.plot(*s["charts/episodic_length"], lw=1.2, color="tab:green")
    length.set_ylabel("episode length")
    length.set_xlabel("environment steps")
    if not s["charts/episodic_return"][0]:
        ret.text(0.5, 0.5, "no episode finished yet", ha="center", va="center", transform=ret.transAxes)
    for ax in (ret, length):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    path = run_dir / FILENAME
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    return path


def try_write_curves(run_dir: str | Path, title: str = "") -> Path | None:
    """:func:`write_curves`, logging instead of raising: a plot never stops a training run."""
    try:
        return write_curves(run_dir, title)
    except Exception as err:  # e.g. a broken matplotlib install or a full disk
        log.warning("could not draw %s/%s: %s", run_dir, FILENAME, err)
        return None
