"""`fastalign info`: versions, device, which backend is active and why; with --model, the fused-head check."""
import json
import platform


def backend_status():
    """(active backend for this machine's default device, why) and the state of each backend."""
    import torch

    from fastalign import _ext
    from fastalign.backends import BACKENDS, _why_unavailable, resolve_backend
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    status = {}
    for name in BACKENDS:
        why = _why_unavailable(name)
        status[name] = "available" if why is None else f"unavailable: {why}"
    status["cpp"] = _ext.describe()  # prebuilt / JIT-built / unavailable: reason
    active = resolve_backend("auto", device, torch.float32)
    if active == "cpp":
        reason = f"CPU tensors; C++ extension {_ext.describe()}"
    elif active == "triton":
        reason = "CUDA tensors" if device.type == "cuda" else "TRITON_INTERPRET=1 (CPU interpreter)"
    elif device.type == "cpu":
        reason = f"CPU tensors; C++ extension {_ext.describe()}"
    else:
        reason = f"triton {status['triton']}"
    return active, reason, status


def info_dict():
    import torch

    import fastalign
    from fastalign import _ext
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU-only machines
        triton_version = None
    try:
        import transformers
        transformers_version = transformers.__version__
    except Exception:
        transformers_version = None
    cuda = torch.cuda.is_available()
    active, reason, status = backend_status()
    return {
        "fastalign": fastalign.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers_version,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "active_backend": f"{active} ({reason})",
        "cpp_extension": status["cpp"],
        "extension_built": _ext.C is not None,
        "extension_source": _ext.SOURCE,
        "extension_error": _ext.ERROR,
        "backends": fastalign.available_backends(),
        "backend_status": {k: v for k, v in status.items() if k != "cpp"},
        "cpu_chunk_tiles": _thin_chunk_tiles(),
        "cpu_isa_cap": _ext.check_cpu_isa_cap(),
    }


def _thin_chunk_tiles():
    """Which tiles the fused thin-chunk pass (fp32, chunk_rows <= 128; 64 with AVX2) runs on this CPU, or why none
    runs."""
    from fastalign.backends import loss_rows_cpp
    return loss_rows_cpp.chunk_gemms_isa() or "none (BLAS chunks): no C++ extension, or no AVX-512 nor AVX2+FMA"


def model_check(args):
    """Load --model and run the fused-head probe; a mismatch raises (the CLI prints it, exit code 2)."""
    from fastalign.cli.common import load_model
    from fastalign.integrations.probe import check_fused_head
    model, _, _ = load_model("causal-lm", args.model, torch_dtype=args.torch_dtype,
                             attn_implementation=args.attn_implementation)
    n = sum(p.numel() for p in model.parameters())
    result = check_fused_head(model, backend=args.backend)
    return {"model": args.model, "model_class": type(model).__name__, "parameters": n,
            "model_check": result.summary()}


def cmd_info(args):
    d = info_dict()
    if args.model:
        d.update(model_check(args))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    width = max(map(len, d))
    for k, v in d.items():
        if k in ("extension_error", "extension_source") and v is None or k == "extension_built":
            continue
        if isinstance(v, dict):
            v = "; ".join(f"{name}: {state}" for name, state in v.items())
        print(f"{k:<{width}}  {', '.join(v) if isinstance(v, list) else v}")
    return 0


def register(sub):
    from fastalign.cli.common import add_model_loading_flags
    pi = sub.add_parser("info", help="versions, device, which backend is active and why; --model checks a model",
                        description="Versions, device, and which fused-op backend is active and why (the C++ "
                        "extension prebuilt, built on first use, or unavailable with the reason). With --model, "
                        "also check that the fused path reproduces that model's own log-probs.")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    pi.add_argument("--model", default=None, help="local save_pretrained folder of a causal LM to check (default: none)")
    pi.add_argument("--backend", default="auto", choices=("auto", "triton", "cpp", "torch"),
                    help="backend for the --model check (default: auto)")
    add_model_loading_flags(pi)
    pi.set_defaults(func=cmd_info)
