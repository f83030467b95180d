"""What ships: a wheel of this checkout holds the packages sidecar, certs and control only.

No top-level ``examples`` package lands in site-packages (a name that generic would clash
with anyone's), and no test helper (the test PKI that mints deliberately bad certificates)
is installed. The wheel is built from a copy, so the checkout gets no build/ or egg-info.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from sidecar import compiled

ROOT = Path(__file__).resolve().parents[2]
_COPY = ("pyproject.toml", "README.md", "sidecar", "certs", "control", "examples", "tests")


def test_wheel_holds_sidecar_certs_and_control_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in _COPY:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=skip)
        else:
            shutil.copy2(path, src / name)
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"sidecar", "certs", "control"}
    assert "certs/testing.py" not in names
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    assert "sidecar/config/redact.py" in names and "control/cli.py" in names
    # what `python -m sidecar.compiled build` compiles besides the modules: the wire's C helpers
    assert {"sidecar/http/_wire.pyi", *(f"sidecar/{name}" for name in (*compiled.WIRE_SOURCES, *compiled.WIRE_HEADERS,
                                                                      *compiled.LLHTTP_FILES))} <= set(names)
