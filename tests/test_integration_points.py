"""The op as other tools see it: custom ops with fake kernels, torch.compile, the CLI."""
import json
import subprocess
import sys

import pytest
import torch

import fastalign as fa
from tests.backends import cpu_backends
from tests.reference import reference_linear_logprobs


def _args(n=9, h=16, v=70):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, h, generator=g), torch.randn(v, h, generator=g), torch.randn(v, generator=g),
            torch.randint(0, v, (n,), generator=g))


@pytest.mark.skipif("cpp" not in fa.available_backends(), reason="extension not built")
def test_cpp_custom_ops_pass_opcheck():
    from fastalign.backends import cpp_backend
    h, w, b, t = _args()
    torch.library.opcheck(cpp_backend._fwd, (h, w, b, t, 1.0, -1.0))
    lse = torch.logsumexp(h @ w.t() + b, -1)
    torch.library.opcheck(cpp_backend._bwd, (torch.randn(9), h, w, b, t, lse, 1.0, -1.0, True, True, True, 0.0))


@pytest.mark.skipif("triton" not in cpu_backends(), reason="triton unavailable")
def test_triton_custom_op_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastalign.backends import triton_backend
    with FakeTensorMode():
        h, w, b, t = (torch.empty(9, 16), torch.empty(70, 16), torch.empty(70), torch.zeros(9, dtype=torch.long))
        logp, lse = triton_backend._fwd(h, w, b, t, 1.0, -1.0)
        d_h, d_w, d_b = triton_backend._bwd(torch.empty(9), h, w, b, t, lse, 1.0, -1.0, True, False, True,
                                                "atomic")
    assert logp.shape == (9,) and d_h.shape == (9, 16) and d_w.shape == (0,) and d_b.shape == (70,)


@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch") if b in fa.available_backends()])
def test_torch_compile_traces_through(backend):
    h, w, b, t = _args()
    h.requires_grad_()
    w.requires_grad_()

    def loss(h, w, b, t):
        return -(fa.linear_logprobs(h, w, t, b, backend=backend) * 2.0).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=False)
    out = compiled(h, w, b, t)
    out.backward()
    h2 = h.detach().double().requires_grad_()
    w2 = w.detach().double().requires_grad_()
    ref = -(reference_linear_logprobs(h2, w2, t, b) * 2.0).sum()
    ref.backward()
    assert abs(out.item() - ref.item()) < 1e-3
    assert (h.grad.double() - h2.grad).abs().max() < 1e-4
    assert (w.grad.double() - w2.grad).abs().max() < 1e-4


def test_cli_info_json():
    out = subprocess.run([sys.executable, "-m", "fastalign.cli", "info", "--json"], capture_output=True, text=True,
                         check=True)
    d = json.loads(out.stdout)
    assert d["torch"] == torch.__version__
    assert "torch" in d["backends"]
    assert d["extension_built"] == ("cpp" in fa.available_backends())


def test_kernels_installed_as_subpackage_only(tmp_path):
    """Outside the checkout, `fastalign.kernels` imports, and a top-level `kernels` is not fastalign's (it is
    absent, or Hugging Face's `kernels`, a dependency of transformers since 5.25)."""
    code = ("import importlib.util, os, fastalign.kernels as k; s = importlib.util.find_spec('kernels'); "
            "print(k.__name__, s is None or os.path.dirname(s.origin) != os.path.dirname(k.__file__))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fastalign.kernels", "True"]


def test_checkout_root_on_sys_path_does_not_shadow_hugging_face_kernels():
    """Run from the root of a checkout (`python -m`, pytest), `import kernels` finds the kernels/ folder first. Where
    Hugging Face's `kernels` is installed (transformers 5.25 imports it with its activations), the folder hands the
    import over to it; and transformers' models import either way."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import importlib.metadata, os\n"
            "try:\n    importlib.metadata.version('kernels')\nexcept importlib.metadata.PackageNotFoundError:\n"
            "    installed = False\nelse:\n    installed = True\n"
            "import kernels\n"
            "print(installed, os.path.dirname(kernels.__file__) != os.path.join(os.getcwd(), 'kernels'))\n"
            "import transformers\ntransformers.LlamaForCausalLM\nimport fastalign.kernels.nn_count\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert lines[0] in ("True True", "False False") and lines[1] == "ok", out.stdout
