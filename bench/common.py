"""Shared by the bench_<op>.py scripts: environment record, the --jsonl stream and the dry run, markdown
tables, JSON and PNG output.

The contract every bench/bench_*.py keeps (bench/run_gpu.sh relies on it):
- ``--jsonl PATH``: one JSON object per line, appended and flushed as each row is measured, so a run killed
  at a time limit still returns what it measured. The first line is ``{"kind": "environment", ...}`` (device,
  torch/triton/transformers/peer versions, date, git commit, CPU model); result rows carry ``"kind": "row"``.
- ``FASTALIGN_GPU_DRYRUN=1``: tiny shapes, one repeat, seconds on CPU (the plumbing, tested in CI).
- A variant that fails or a peer that is not installed is a row saying so; the script still exits 0, except
  the documented CHECK rows.
"""
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import textwrap
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VENDORED_PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".peers")  # bench/vendor_peers.sh
if os.path.isdir(VENDORED_PEERS) and VENDORED_PEERS not in sys.path:
    sys.path.append(VENDORED_PEERS)  # after site-packages: an installed peer wins
DRYRUN_ENV = "FASTALIGN_GPU_DRYRUN"
PEERS = ("liger_kernel", "cut_cross_entropy", "trl")  # import names of the optional `bench` extra


def dryrun():
    """True when FASTALIGN_GPU_DRYRUN is set (to anything but 0/empty): tiny shapes, one repeat."""
    return os.environ.get(DRYRUN_ENV, "0").strip() not in ("", "0")


def cpu_model():
    """CPU model name and the SIMD flags that decide BLAS and vector speed, from /proc/cpuinfo (Linux)."""
    out = {"cpu_model": None, "cpu_flags": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and out["cpu_model"] is None:
                    out["cpu_model"] = value.strip()
                elif key == "flags" and out["cpu_flags"] is None:
                    out["cpu_flags"] = " ".join(x for x in value.split() if x.startswith(("avx", "fma", "amx", "sse4")))
                elif key == "cpu family" and "cpu_family" not in out:
                    out["cpu_family"] = value.strip()
    except OSError:
        pass
    out["cpu_count"] = os.cpu_count()
    out["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return out


# --cpu-isa: what makes the GEMM libraries in the process run a narrower instruction set than the CPU has (each reads
# its variable once, when it loads): fastalign's extension, MKL (the floor's GEMMs) and oneDNN. A CPU with AVX-512
# then runs what a CPU with AVX2 alone (an AMD Zen 3, say) runs, with its own caches and clocks: a stand-in for the
# other CPU's ratios, not a measurement of it. ATen's own elementwise kernels are left as they are: with
# ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU, torch 2.13's compiled backward of naive's log_softmax + gather returned
# NaN (V=32000; the bench's naive+compile row failed with an out-of-range index), so naive's elementwise passes run
# wider here than on an AVX2 CPU.
CPU_ISA_ENV = {
    "avx2": {"FASTALIGN_CPU_ISA": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"FASTALIGN_CPU_ISA": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
}


def add_cpu_isa_arg(parser):
    parser.add_argument("--cpu-isa", choices=list(CPU_ISA_ENV),
                        help="run the GEMMs as a CPU without the wider sets would (avx2: no AVX-512, no AMX; avx512: "
                             "no AMX): fastalign's extension, MKL (the floor) and oneDNN alike; the script runs itself "
                             "again with " + ", ".join(CPU_ISA_ENV["avx2"]) + " set")
    return parser


def rerun_with_cpu_isa(isa, script, argv):
    """Replace this process by ``script argv`` with isa's variables set (CPU_ISA_ENV), unless they are set already.
    Returns only when nothing needed changing."""
    want = CPU_ISA_ENV[isa]
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    print(f"--cpu-isa {isa}: running again with " + " ".join(f"{k}={v}" for k, v in want.items()), file=sys.stderr,
          flush=True)
    os.execve(sys.executable, [sys.executable, os.path.abspath(script), *argv], {**os.environ, **want})


def git_commit():
    """HEAD of the checkout the bench runs from (None outside git), '+dirty' when tracked files changed."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=here).stdout.strip() or None
        if head:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10, cwd=here).stdout.strip()
            head += "+dirty" if dirty else ""
        return head or os.environ.get("FASTALIGN_GIT_COMMIT")
    except Exception:  # no git (a copy of the tree on a lent GPU): run_gpu.sh passes the commit along
        return os.environ.get("FASTALIGN_GIT_COMMIT")


def peer_versions():
    """{import name: version or None} of the optional peers (Liger-Kernel, Cut Cross-Entropy, TRL)."""
    from importlib import metadata
    out = {}
    for name, dist in (("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy"), ("trl", "trl")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment():
    from fastalign.cli.info import info_dict
    from fastalign.profiling import MMAP_THRESHOLD_MAX, set_mmap_threshold
    # timed runs in the allocator regime of a long-running process (PeakMemory lowers it while it measures)
    set_mmap_threshold(MMAP_THRESHOLD_MAX)
    env = info_dict()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["machine"] = platform.machine()
    env["cpu_threads"] = torch.get_num_threads()
    env.update(cpu_model())
    env["git_commit"] = git_commit()
    env["peers"] = peer_versions()
    env["dryrun"] = dryrun()
    env["cpu_isa_env"] = {k: os.environ[k] for k in (*CPU_ISA_ENV["avx2"], "ATEN_CPU_CAPABILITY") if k in os.environ}
    env["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if env["cuda_available"]:
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def add_common_args(parser):
    """--jsonl PATH and --out DIR, shared by every bench script."""
    parser.add_argument("--out", metavar="DIR", help="folder for the JSON and PNG results (default: bench/results)")
    parser.add_argument("--jsonl", metavar="PATH",
                        help="also append every row to PATH as it is measured (one JSON object per line, flushed; "
                             "the first line is the environment)")
    return parser


class JsonlStream:
    """Appends one JSON object per line to ``path`` and flushes each, so a run killed midway keeps its rows.
    The environment line is written on creation; ``row()`` writes ``{"kind": "row", "benchmark": ..., ...}``.
    A None path makes every call a no-op."""

    def __init__(self, path, benchmark, env):
        self.benchmark = benchmark
        self._f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "a", buffering=1)
            self._write({"kind": "environment", "benchmark": benchmark, **env})

    def _write(self, obj):
        if self._f is not None:
            self._f.write(json.dumps(obj, default=str) + "\n")
            self._f.flush()

    def row(self, row):
        self._write({"kind": "row", "benchmark": self.benchmark, **row})
        return row

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


def measure(step, device, repeats, label, warmup=True):
    """(median seconds, peak extra bytes) of step() after one warm-up run (compilation and autotuning happen
    there, outside the measurement); None, reported on stderr, when the variant fails (e.g. torch.compile
    unavailable, out of memory) so that the others still run. warmup=False with repeats=1: one run gives both
    (for steps that take minutes and compile nothing)."""
    from fastalign.profiling import PeakMemory, _sync, median_time
    try:
        if not warmup and repeats == 1:
            with PeakMemory(device) as mem:
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                seconds = time.perf_counter() - t0
            return seconds, mem.peak_bytes
        if warmup:
            step()
        with PeakMemory(device) as mem:
            step()
        return median_time(step, warmup=0, repeats=repeats, device=device), mem.peak_bytes
    except Exception as exc:
        print(f"  {label}: failed ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
        return None, f"{type(exc).__name__}: {exc}"[:300]


def interleaved_times(steps, device, repeats):
    """{name: [seconds of each round]}: each round runs every step once, so load changes hit every variant alike. The first
    round runs them in the given order, each later one in its own shuffled order (seeded: the same every run), so no
    variant always follows the same one: in ad-hoc runs on a 2-core Xeon, the variant run just before moved the
    fastalign NLL with 64-row chunks by 0-10% (after the 512-row one against after the floor, fp32, N=2048 H=1024
    V=32000; README, The CPU goal)."""
    from fastalign.profiling import _sync
    times = {name: [] for name in steps}
    for r in range(repeats):
        order = list(steps)
        if r:
            random.Random(r).shuffle(order)
        for name in order:
            step = steps[name]
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def medians_of(times):
    """{name: median seconds} of interleaved_times' {name: [seconds of each round]}."""
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_medians(steps, device, repeats):
    """{name: median seconds} of interleaved_times."""
    return medians_of(interleaved_times(steps, device, repeats))


def paired_ratio(times, name, base):
    """Median over rounds of name's time / base's time in the same round (interleaved_times): a drift of the
    machine's speed over the run, slower than a round, cancels out of it."""
    return statistics.median(t / b for t, b in zip(times[name], times[base]))


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


def result_path(name, env, ext, out_dir=None):
    """<out_dir or bench/results>/<name>-<cuda|cpu>[-dryrun]-<date>.<ext>; a dry run never overwrites results."""
    tag = ("cuda" if env["cuda_available"] else "cpu") + ("-dryrun" if env.get("dryrun") else "")
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, f"{name}-{tag}-{env['date'][:10]}.{ext}")


def write_results(name, env, rows, table, out_dir=None):
    path = result_path(name, env, "json", out_dir)
    with open(path, "w") as f:
        json.dump({"benchmark": name, "environment": env, "results": rows, "table": table}, f, indent=2)
    return path


def publish(name, env, rows, table, out_dir, plot_rows, metrics, versions=""):
    """What every bench's main() ends with: a line on the environment, the table, the JSON and the ratio PNG
    (bars per shape, one per variant); returns the JSON's path."""
    print(f"\nfastalign {env['fastalign']} ({env['git_commit']}), torch {env['torch']}{versions}, on {env['device']}, "
          f"{env.get('cpu_model')} [{env.get('cpu_flags')}], load {env.get('load_average')}, {env['date']}\n")
    print(table)
    path = write_results(name, env, rows, table, out_dir)
    plot = ratio_plot(name, env, plot_rows, "shape", "variant", metrics, out_dir)
    print(f"\nresults: {path}" + (f"\nplot: {plot}" if plot else ""))
    return path


def ratio_plot(name, env, rows, group_key, label_key, metrics, out_dir=None):
    """One PNG with a bar group per shape: each metric is a ratio against the baseline (1.0 line)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = list(dict.fromkeys(r[group_key] for r in rows))
    labels = list(dict.fromkeys(r[label_key] for r in rows))
    # the legend goes under the bars (inside the axes it covered them once there were a dozen variants)
    legend_rows = -(-len(labels) // 3)
    legend_height = 0.22 * legend_rows + 0.2 if labels else 0.0
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4 + legend_height), squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, (key, title) in zip(axes[0], metrics):
        for i, lab in enumerate(labels):
            ys = [next((r[key] for r in rows if r[group_key] == g and r[label_key] == lab and r.get(key) is not None),
                       0) for g in groups]
            color = plt.cm.tab20(i % 20) if len(labels) > 10 else None  # the default cycle repeats after 10
            ax.bar([j + i * width for j in range(len(groups))], ys, width, label=lab, color=color)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels([textwrap.fill(str(g), 24) for g in groups], fontsize=7)
        ax.set_title(title)
    if labels:
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    else:  # nothing measured against the baseline (e.g. the baseline peer is not installed)
        axes[0][0].text(0.5, 0.5, "no ratios: the baseline did not run", ha="center", transform=axes[0][0].transAxes)
    fig.suptitle(f"{name} on {env['device']}")
    fig.tight_layout(rect=(0, legend_height / (4 + legend_height), 1, 1))
    path = result_path(name, env, "png", out_dir)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
