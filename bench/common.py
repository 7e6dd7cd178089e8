"""Shared by the bench_<op>.py scripts: environment record, markdown tables, JSON and PNG output."""
import datetime
import json
import os
import platform
import sys

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")



def environment():
    from fastalign.cli.info import info_dict
    env = info_dict()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["machine"] = platform.machine()
    env["cpu_threads"] = torch.get_num_threads()
    return env


def measure(step, device, repeats, label):
    """(median seconds, peak extra bytes) of step() after one warm-up run (compilation and autotuning happen
    there, outside the measurement); None, reported on stderr, when the variant fails (e.g. torch.compile
    unavailable, out of memory) so that the others still run."""
    from fastalign.profiling import PeakMemory, median_time
    try:
        step()
        with PeakMemory(device) as mem:
            step()
        return median_time(step, warmup=0, repeats=repeats, device=device), mem.peak_bytes
    except Exception as exc:
        print(f"  {label}: failed ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
        return None, f"{type(exc).__name__}: {exc}"[:300]


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("n/a" if v is None else (fmt.format(v) if fmt else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_results(name, env, rows, table):
    os.makedirs(RESULTS, exist_ok=True)
    tag = "cuda" if env["cuda_available"] else "cpu"
    stamp = env["date"][:10]
    path = os.path.join(RESULTS, f"{name}-{tag}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": name, "environment": env, "results": rows, "table": table}, f, indent=2)
    return path


def ratio_plot(name, env, rows, group_key, label_key, metrics):
    """One PNG with a bar group per shape: each metric is a ratio against the baseline (1.0 line)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = list(dict.fromkeys(r[group_key] for r in rows))
    labels = list(dict.fromkeys(r[label_key] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, (key, title) in zip(axes[0], metrics):
        for i, lab in enumerate(labels):
            ys = [next((r[key] for r in rows if r[group_key] == g and r[label_key] == lab and r.get(key) is not None),
                       0) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], ys, width, label=lab)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_title(title)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{name} on {env['device']}")
    fig.tight_layout()
    tag = "cuda" if env["cuda_available"] else "cpu"
    path = os.path.join(RESULTS, f"{name}-{tag}-{env['date'][:10]}.png")
    fig.savefig(path, dpi=100)
    return path
