"""`fastalign info`: versions, device, backends, whether the extension built."""
import json
import platform


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
    return {
        "fastalign": fastalign.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers_version,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "extension_built": _ext.C is not None,
        "extension_error": _ext.ERROR,
        "backends": fastalign.available_backends(),
    }


def cmd_info(args):
    d = info_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    width = max(map(len, d))
    for k, v in d.items():
        if k == "extension_error" and v is None:
            continue
        print(f"{k:<{width}}  {', '.join(v) if isinstance(v, list) else v}")
    return 0


def register(sub):
    pi = sub.add_parser("info", help="versions, backends available, device, whether the extension built")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    pi.set_defaults(func=cmd_info)
