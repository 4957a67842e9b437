"""Shared fixtures of the Python tests.

`deepscope_kernelspec` installs the `deepscope` Jupyter kernelspec into a
temporary prefix (`deepscope install --prefix TMP`) and puts it first on
JUPYTER_PATH, so jupyter_client and JupyterLab find kernel `deepscope` without
touching the user's or the venv's Jupyter folders.

The binary is $DEEPSCOPE_BIN if set, else target/release/deepscope (built by
`make build`; CI always builds it). Tests that need the kernel are skipped only
when the binary is missing; a binary whose `install` fails is an error.

Marker `slow`: long tests (minutes) that still run in `make test`; deselect
them locally with `pytest -m "not slow"`.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNEL_NAME = "deepscope"


def deepscope_bin() -> str:
    return os.environ.get("DEEPSCOPE_BIN") or os.path.join(ROOT, "target", "release", "deepscope")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test (minutes); still part of `make test`")


@pytest.fixture(scope="session")
def deepscope_kernelspec(tmp_path_factory):
    """Installs the kernelspec into a temp prefix; yields the kernelspec folder."""
    binary = deepscope_bin()
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        pytest.skip(f"the deepscope binary is missing ({binary}): build it with `make build` "
                    "or point DEEPSCOPE_BIN at it")
    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    proc = subprocess.run([binary, "install", "--prefix", str(prefix)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"`{binary} install --prefix {prefix}` failed (exit {proc.returncode})\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    data_dir = prefix / "share" / "jupyter"
    spec_dir = data_dir / "kernels" / KERNEL_NAME
    assert (spec_dir / "kernel.json").is_file(), f"`deepscope install` wrote no {spec_dir / 'kernel.json'}"
    json.loads((spec_dir / "kernel.json").read_text())  # well-formed

    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "PATH", "VIRTUAL_ENV", "LIBTORCH_USE_PYTORCH")}
    # First on JUPYTER_PATH: wins over any `deepscope` kernelspec installed elsewhere.
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(data_dir), saved["JUPYTER_PATH"]) if p)
    # The kernel builds cells with cargo against the venv's libtorch; give it the
    # environment `make test` exports, also when pytest is started by hand.
    if sys.prefix != sys.base_prefix:
        os.environ.setdefault("VIRTUAL_ENV", sys.prefix)
        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("LIBTORCH_USE_PYTORCH", "1")

    from jupyter_client.kernelspec import KernelSpecManager
    found = KernelSpecManager().find_kernel_specs().get(KERNEL_NAME)
    assert found and os.path.samefile(found, spec_dir), (
        f"jupyter_client finds kernel {KERNEL_NAME!r} at {found}, not at {spec_dir}")
    try:
        yield spec_dir
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
