"""tests/native against an ASan/UBSan build of the engine (docs/native.md, "Under sanitizers"): the engine
is built with -fsanitize=address,undefined into a copy of the package in a tmp folder, and the rest of
tests/native runs there in a subprocess with libasan and libubsan preloaded; any memory error or undefined
behaviour aborts it. Slower than a unit test (a build, then tests/native once more: about 10 s here), so it runs
in the stateful lane."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import constmig

pytestmark = pytest.mark.stateful

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FLAGS = ["-shared", "-fPIC", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
         "-fno-omit-frame-pointer", "-Wall", "-Werror"]


def _runtime(gcc: str, name: str) -> str | None:
    """The absolute path of gcc's sanitizer runtime `name`, or None where it is not installed."""
    out = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


def _why_not(gcc: str | None) -> str | None:
    """Why the sanitized build cannot run here (None when it can)."""
    if gcc is None:
        return "no gcc on PATH"
    probe = subprocess.run([gcc, "-E", "-x", "c", "-"], input="#include <openssl/evp.h>\n", capture_output=True,
                           text=True)
    if probe.returncode:
        return "no OpenSSL headers (openssl/evp.h; apt-get install libssl-dev)"
    for lib in ("libasan.so", "libubsan.so"):
        if _runtime(gcc, lib) is None:
            return f"gcc has no {lib} (apt-get install libasan8 libubsan1, or the gcc that ships them)"
    return None


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the package whose engine is the sanitized build, and the environment that runs it."""
    gcc = shutil.which("gcc")
    if (why := _why_not(gcc)) is not None:
        pytest.skip(f"sanitizer lane cannot run: {why}")
    assert gcc is not None
    root = tmp_path_factory.mktemp("asan")
    pkg = root / "constmig"
    shutil.copytree(Path(constmig.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for so in (pkg / "native").glob("_engine*.so"):
        so.unlink()
    target = pkg / "native" / f"_engine{sysconfig.get_config_var('EXT_SUFFIX')}"
    build = subprocess.run([gcc, *FLAGS, f"-I{sysconfig.get_paths()['include']}", str(pkg / "native" / "_engine.c"),
                            "-o", str(target), "-lcrypto"], capture_output=True, text=True)
    assert build.returncode == 0, f"sanitized build failed:\n{build.stderr}"
    env = {**os.environ, "PYTHONPATH": str(root), "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
           "LD_PRELOAD": f"{_runtime(gcc, 'libasan.so')} {_runtime(gcc, 'libubsan.so')}"}
    return target, env


def test_the_subprocess_loads_the_sanitized_engine(sanitized: tuple[Path, dict[str, str]]) -> None:
    """Positive control: the run below tests the sanitized build, not the installed one."""
    target, env = sanitized
    code = ("import constmig.native._engine as e; print(e.__file__); "
            "print(any('libasan' in line for line in open('/proc/self/maps')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    where, asan = p.stdout.split()
    assert Path(where) == target and asan == "True", p.stdout


def test_native_tests_pass_under_asan_and_ubsan(sanitized: tuple[Path, dict[str, str]]) -> None:
    _, env = sanitized
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE),
                        f"--ignore={Path(__file__).resolve()}"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    out = p.stdout + p.stderr
    assert "AddressSanitizer" not in out and "runtime error:" not in out, out[-4000:]
    assert p.returncode == 0, out[-4000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 50 and " failed" not in out, out[-2000:]  # the whole of tests/native
