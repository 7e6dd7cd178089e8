"""First row of every bench/run_gpu.sh stage: device (nvidia-smi), versions, date, git commit.

usage: environment.py --stage NAME --jsonl PATH
Appends one {"kind": "environment", "source": "run_gpu.sh", ...} line to PATH and prints nvidia-smi and a
summary for the log. Never fails the stage for a missing tool: what could not be read is recorded as None.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys

SMI_FIELDS = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,compute_mode"
PACKAGES = ("torch", "triton", "transformers", "peft", "accelerate", "numpy", "liger-kernel", "cut-cross-entropy",
            "trl", "datasets")


def run(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return r.stdout if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def nvidia_smi():
    """[{field: value}] per GPU from nvidia-smi's CSV query, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    text = run(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"])
    if text is None:
        return None
    keys = SMI_FIELDS.split(",")
    return [dict(zip(keys, (x.strip() for x in line.split(",")))) for line in text.strip().splitlines()]


def versions():
    from importlib import metadata
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def wheel_versions():
    """{distribution: version} of what run_gpu.sh installed from .whl/ ($FASTALIGN_GPU_SITE), read through
    sys.path: a version here means the stage's Python sees the package."""
    from importlib import metadata
    site = os.environ.get("FASTALIGN_GPU_SITE")
    if not site or not os.path.isdir(site):
        return None
    out = {}
    for dist in metadata.distributions(path=[site]):
        name = dist.metadata["Name"]
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(stage):
    env = {"kind": "environment", "source": "run_gpu.sh", "stage": stage,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "git_commit": os.environ.get("FASTALIGN_GIT_COMMIT") or None,
           "dryrun": os.environ.get("FASTALIGN_GPU_DRYRUN", "0") not in ("", "0"),
           "python": platform.python_version(), "platform": platform.platform(), "hostname": platform.node(),
           "cpu_count": os.cpu_count(), "nvidia_smi": nvidia_smi(), "versions": versions(),
           "wheels": wheel_versions()}
    try:
        import torch
        env["cuda_available"] = torch.cuda.is_available()
        env["torch_cuda"] = torch.version.cuda
        if env["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            env["device"] = torch.cuda.get_device_name(0)
            env["device_count"] = torch.cuda.device_count()
            env["capability"] = f"{props.major}.{props.minor}"
            env["multiprocessors"] = props.multi_processor_count
            env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        else:
            env["device"] = f"cpu ({torch.get_num_threads()} threads)"
    except Exception as e:  # recorded, not fatal: the steps after this one say more
        env["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        import fastalign
        env["fastalign"] = fastalign.__version__
        env["backends"] = fastalign.available_backends()
    except Exception as e:
        env["fastalign_error"] = f"{type(e).__name__}: {e}"
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", required=True)
    p.add_argument("--jsonl", required=True)
    args = p.parse_args(argv)
    if shutil.which("nvidia-smi"):
        print(run(["nvidia-smi"]) or "nvidia-smi failed", flush=True)
    env = environment(args.stage)
    with open(args.jsonl, "a") as f:
        f.write(json.dumps(env, default=str) + "\n")
    for key in ("date", "git_commit", "device", "python", "versions", "wheels", "backends", "torch_error",
                "fastalign_error"):
        if key in env:
            print(f"{key}: {env[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
