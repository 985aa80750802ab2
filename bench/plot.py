"""The cold-start timeline as a PNG: one panel per case, the worker's phases against the naive baseline,
the import floor and the raw read, in seconds from process start (the median run of each)."""

from __future__ import annotations

from pathlib import Path

COLORS = {
    "readahead": "#17becf", "resolve": "#8c564b", "prefetch": "#bcbd22", "imports": "#1f77b4",
    "tokenizer": "#9467bd", "model": "#e377c2", "weights": "#d62728", "warm-up": "#ff7f0e", "load": "#d62728",
    "generate": "#ff7f0e", "import floor": "#1f77b4", "raw read": "#2ca02c",
}  # fmt: skip
BACKGROUND = ("readahead", "prefetch")  # the worker's phases that run beside the others, a row each


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(result["cases"])
    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 2.7 * len(cases) + 1.0), squeeze=False)
    for ax, name in zip(axes[:, 0], cases):
        case = result["cases"][name]
        worker = [(p["name"], p["start_s"], p["seconds"]) for p in case["phases"] if p["name"] != "ready"]
        rows = [
            ("worker", [segment for segment in worker if segment[0] not in BACKGROUND]),
            *((f"  {name}", [segment for segment in worker if segment[0] == name]) for name in BACKGROUND),
            ("naive", _naive_segments(case)),
            ("import floor", [("import floor", 0.0, case["median"]["import_floor_s"])]),
            ("raw read", [("raw read", 0.0, case["median"]["raw_read_s"])]),
        ]
        for y, (_, segments) in enumerate(rows):
            for label, start, seconds in segments:
                ax.barh(y, seconds, left=start, color=COLORS.get(label, "#7f7f7f"), edgecolor="white", label=label)
        naive_row = [label for label, _ in rows].index("naive")
        for y, seconds in ((0, case["median"]["ready_s"]), (naive_row, case["median"]["naive_ready_s"])):
            ax.text(seconds, y, f" {seconds:.2f} s", va="center", fontsize=8)
        ax.margins(x=0.1)
        ax.set_yticks(range(len(rows)), [label for label, _ in rows])
        ax.invert_yaxis()
        ax.set_title(f"{name}: {case['model']} ({case['weights_gb']:.2f} GB)", fontsize=10, loc="left")
        ax.set_xlabel("seconds from process start (median run)")
    handles = {}
    for ax in axes[:, 0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=(len(handles) + 1) // 2, fontsize=8)
    machine = result["machine"]
    gpu = machine["gpu"] or "no GPU"
    fig.suptitle(f"Cold start on {machine['cpu']} ({machine['cores']} cores, {gpu})", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _naive_segments(case: dict) -> list[tuple[str, float, float]]:
    """The baseline's own phases, placed so they end at its measured ready (the gap before them is the
    interpreter's start)."""
    phases = case["naive_phases"]
    start = case["median"]["naive_ready_s"] - sum(phases.values())
    segments = []
    for name, seconds in phases.items():
        segments.append((name, start, seconds))
        start += seconds
    return segments
