"""The result of a guidance x temperature sweep: a markdown table and a plot (ImageNet: FID
against IS; digits: Frechet distance against accuracy), one curve per temperature, each point
labelled with its guidance scale."""
from pathlib import Path

SCORE_COLUMNS = ("fid", "is", "precision", "recall", "fd_dinov2", "accuracy", "frechet")


def sweep_table(results: list) -> str:
    scores = [k for k in SCORE_COLUMNS if any(k in r for r in results)]
    head = ["cfg", "temperature", *scores, "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(results, key=lambda r: (r["infer_temperature"], r["cfg"])):
        cells = [f"{r['cfg']:g}", f"{r['infer_temperature']:g}",
                 *(f"{r[k]:.4f}" if k in r else "" for k in scores), f"{r['seconds_per_image']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(results: list, axes: tuple, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x_key, y_key = axes
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for temperature in sorted({r["infer_temperature"] for r in results}):
        points = sorted((r for r in results if r["infer_temperature"] == temperature),
                        key=lambda r: r["cfg"])
        ax.plot([r[x_key] for r in points], [r[y_key] for r in points], "o-",
                label=f"temperature {temperature:g}")
        for r in points:
            ax.annotate(f"cfg {r['cfg']:g}", (r[x_key], r[y_key]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xlabel(x_key.upper() if x_key == "fid" else x_key.replace("_", " "))
    ax.set_ylabel(y_key.upper() if y_key == "is" else y_key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_sweep(results: list, axes: tuple, stem) -> tuple:
    """<stem>.md and <stem>.png; returns their paths."""
    stem = Path(stem)
    table = stem.with_suffix(".md")
    table.write_text(sweep_table(results))
    return table, plot_sweep(results, axes, stem.with_suffix(".png"))
