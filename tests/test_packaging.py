"""Packaging: the sdist and the wheel carry the C++ sources, the test helpers and the LICENSE; installed into a
fresh virtual environment, each gives a working cpp backend (compiled on first use when the wheel has no
prebuilt extension, as `pip install .` with build isolation and no torch produces)."""
import glob
import os
import subprocess
import sys
import sysconfig
import tarfile
import threading
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTALIGN_NO_EXT", "FASTALIGN_NO_JIT",
                                                              "TRITON_INTERPRET")}
    env.update(extra)
    return env


def _build(kind, src, out):
    """setuptools' PEP 517 hook, in a child process, without isolation (nothing downloaded). FASTALIGN_NO_EXT=1:
    no prebuilt extension, which is what an isolated build without torch gives."""
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({out!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=src, env=_env(FASTALIGN_NO_EXT="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return os.path.join(out, r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(sdist, wheel): the wheel is built from the unpacked sdist, as pip does."""
    out = str(tmp_path_factory.mktemp("dist"))
    sdist = _build("sdist", ROOT, out)
    unpack = str(tmp_path_factory.mktemp("unpacked"))
    with tarfile.open(sdist) as tf:
        try:
            tf.extractall(unpack, filter="data")
        except TypeError:  # Python without extraction filters
            tf.extractall(unpack)
    wheel = _build("wheel", glob.glob(os.path.join(unpack, "fastalign-*"))[0], out)
    return sdist, wheel


def test_sdist_has_sources_tests_and_license(artifacts):
    with tarfile.open(artifacts[0]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    want = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
            + glob.glob(os.path.join(ROOT, "csrc", "*.h")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))}
    assert want and want <= names, sorted(want - names)
    assert {"LICENSE", "MANIFEST.in", "setup.py", "pyproject.toml", "fastalign/data/personas.jsonl"} <= names
    assert "Apache License" in open(os.path.join(ROOT, "LICENSE")).read(2000)


def test_wheel_ships_sources_for_the_first_use_build(artifacts):
    with zipfile.ZipFile(artifacts[1]) as zf:
        names = set(zf.namelist())
    cpp = {f"fastalign/csrc/{os.path.basename(p)}" for p in glob.glob(os.path.join(ROOT, "csrc", "*.*"))}
    assert cpp <= names and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {"fastalign/kernels/__init__.py", "fastalign/data/personas.jsonl"} <= names
    assert not any(n.endswith(".so") for n in names)


def test_first_use_build_is_locked_and_cached(tmp_path, monkeypatch):
    """Two threads (separate lock-file descriptions, as two processes) ask for the extension at once: one
    compiles, the other waits and loads the cached result."""
    import time

    import torch.utils.cpp_extension as cpp_extension

    from fastalign import _ext
    monkeypatch.setenv("FASTALIGN_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        calls.append(name)
        time.sleep(0.3)
        open(os.path.join(build_directory, name + ".so"), "w").close()
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(_ext, "_import_built", lambda path: "cached module")
    results = []
    threads = [threading.Thread(target=lambda: results.append(_ext.jit_build()[0])) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [_ext.JIT_MODULE_NAME] and sorted(results) == ["cached module", "module"]
    assert len(glob.glob(os.path.join(tmp_path, "extensions", "*", "fastalign_C.so"))) == 1


def test_first_use_build_cache_is_keyed_by_compiler_and_architecture(tmp_path, monkeypatch):
    """A cache shared between toolchains or machines (CXX changed, an NFS home seen from x86-64 and aarch64) never
    hands one's build to the other; the same setup finds the same folder."""
    import platform

    from fastalign import _ext
    files = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.*")))
    monkeypatch.delenv("CXX", raising=False)
    base = _ext._build_key(files)
    assert _ext._build_key(files) == base
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake-cxx 99.1'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert _ext._compiler_id() == f"{fake} fake-cxx 99.1"
    other_compiler = _ext._build_key(files)
    monkeypatch.setenv("CXX", str(tmp_path / "missing-cxx"))  # no such program: still a key, the build says why
    missing = _ext._build_key(files)
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64" if platform.uname().machine != "aarch64" else "x86_64")
    other_machine = _ext._build_key(files)
    assert len({base, other_compiler, missing, other_machine}) == 4


SMOKE = """
import os, sys, torch, fastalign
from fastalign import _ext
assert fastalign.__file__.startswith(sys.prefix), (fastalign.__file__, sys.prefix)
h = torch.randn(37, 24, dtype=torch.float64); w = torch.randn(50, 24, dtype=torch.float64)
t = torch.randint(0, 50, (37,))
got = fastalign.linear_logprobs(h, w, t, backend="cpp")
want = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None]).squeeze(1)
assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()
from fastalign.backends import resolve_backend
assert resolve_backend("auto", h.device, h.dtype) == "cpp" and "cpp" in fastalign.available_backends()
print("SOURCE", _ext.SOURCE)
"""


def _fresh_venv(path):
    """A venv without pip that sees this test environment's packages (torch, ninja...) through a .pth line
    after its own site-packages, so what it installs wins and nothing is downloaded."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    py = os.path.join(path, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "_fastalign_test_parent.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return py


@pytest.mark.slow
def test_sdist_and_wheel_install_into_fresh_venvs_and_use_the_cpp_backend(artifacts, tmp_path):
    cache = str(tmp_path / "cache")  # shared: the first environment compiles, the second finds it cached
    for name, artifact in (("wheel", artifacts[1]), ("sdist", artifacts[0])):
        py = _fresh_venv(tmp_path / name)
        r = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index",
                            "--no-build-isolation", artifact], env=_env(FASTALIGN_NO_EXT="1"), cwd=str(tmp_path),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        r = subprocess.run([py, "-c", SMOKE], env=_env(FASTALIGN_CACHE_DIR=cache), cwd=str(tmp_path),
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{name}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        assert "SOURCE jit" in r.stdout
        assert ("compiling the C++ extension" in r.stderr) == (name == "wheel"), r.stderr[-2000:]
        r = subprocess.run([os.path.join(tmp_path, name, "bin", "fastalign"), "info"], env=_env(FASTALIGN_CACHE_DIR=cache),
                           cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "active_backend    cpp (CPU tensors; C++ extension JIT-built" in r.stdout, r.stdout
