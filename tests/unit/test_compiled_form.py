"""The hot path's compiled form (``sidecar/compiled.py``): which form is on disk, when it is
stale, that ``PAKE_PURE_PYTHON=1`` runs the source, and that a failed build leaves the
pure-Python sidecar behind, never a half-built one."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import compiled

ROOT = Path(__file__).resolve().parents[2]


def fake_package(tmp_path: Path) -> Path:
    """A ``sidecar`` tree with every hot module as a tiny typed source."""
    package = tmp_path / "sidecar"
    for entry in (e for entries in compiled.GROUPS.values() for e in entries):
        path = package / entry
        if path.suffix != ".py":
            path.mkdir(parents=True, exist_ok=True)
            (path / "__init__.py").write_text("")
            path = path / "mod.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def name() -> str:\n    return {str(path.relative_to(package))!r}\n")
    (package / "__init__.py").write_text("")
    for path in compiled.wire_inputs(package)[:-1]:  # _wire.c and llhttp's files
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"/* {path.name} */\n")
    (package / "compiled.py").write_text("# the build's options\n")
    return package


def age(path: Path, seconds: float) -> None:
    st = path.stat()
    os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def test_the_form_on_disk_is_python_until_built_and_stale_once_a_source_is_newer(tmp_path: Path) -> None:
    package = fake_package(tmp_path)
    sources = compiled.sources(package)
    # one file per entry (a directory's: mod.py), each in one library only
    assert len(sources) == len(set(sources)) == sum(len(e) for e in compiled.GROUPS.values())
    assert [len(files) for files in compiled.groups(package).values()] == [
        len(entries) for entries in compiled.GROUPS.values()]
    assert all(s.name != "__init__.py" for s in sources)
    assert (compiled.form(package), compiled.stale(package)) == ("python", [])

    for source in sources:  # what a build leaves: an extension beside each source, newer
        age(source, 60)
        compiled.extension_of(source).write_bytes(b"")
    for library in compiled.group_libraries(package):
        library.write_bytes(b"")
    wire = compiled.wire_module(package)
    assert compiled.stale(package) == [package / compiled.WIRE_SOURCE]  # the C module is part of it
    for path in compiled.wire_inputs(package):
        age(path, 60)
    wire.write_bytes(b"")
    assert (compiled.form(package), compiled.stale(package)) == ("compiled", [])
    # another llhttp copied in, an edit of ours, other build options
    for name in (*compiled.LLHTTP_FILES, *compiled.WIRE_SOURCES[1:], *compiled.WIRE_HEADERS, "compiled.py"):
        path = package / name
        path.write_text(path.read_text() + "/* 9.5 */\n")
        assert compiled.stale(package) == [package / compiled.WIRE_SOURCE], name
        age(path, 60)

    edited = sources[3]
    edited.write_text(edited.read_text() + "# an edit after the build\n")
    assert compiled.form(package) == "stale"
    assert compiled.stale(package) == [edited]

    compiled.extension_of(sources[0]).unlink()  # half a build is stale too
    assert compiled.stale(package) == [sources[0], edited]

    orphan = compiled.extension_of(package / "upstream" / "gone.py")
    orphan.write_bytes(b"")  # a module an earlier build compiled and this one does not
    assert compiled.stale(package) == [sources[0], edited, orphan]

    # the other extensions, the libraries, the C module and the orphan
    assert compiled.clean(package) == len(sources) - 1 + len(compiled.group_libraries(package)) + 1 + 1
    assert (compiled.form(package), list(package.rglob("*.so"))) == ("python", [])


def run_python(code: str, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=60, check=True)
    return result.stdout.strip()


WHICH = "import sidecar.pipeline as p, sidecar.upstream.pool as q; print(p.__file__, q.__file__)"


def test_pake_pure_python_runs_the_source_even_beside_a_compiled_form() -> None:
    files = run_python(WHICH, PAKE_PURE_PYTHON="1").split()
    assert [Path(f).suffix for f in files] == [".py", ".py"]
    # nor a module that is only an extension: the parsers drive llhttp through httptools
    code = ("import sidecar.http.wire as m\ntry:\n    import sidecar.http._wire\n"
            "except ImportError:\n    print(m.GATHERS_HEADERS, m.HEAD, 'refused')\nelse:\n    print('loaded')")
    assert run_python(code, PAKE_PURE_PYTHON="1") == "False None refused"


def require_compiled() -> None:
    """Skip where no compiled form is built (no C compiler); under CI, which builds it, fail."""
    if compiled.form() != "compiled":
        if os.environ.get("CI"):
            pytest.fail("CI builds the compiled form (`make test` runs `sidecar.compiled build --required`)")
        pytest.skip("the compiled form is not built here (no C compiler?)")


def test_a_built_hot_path_is_what_python_imports() -> None:
    require_compiled()
    files = run_python(WHICH, PAKE_PURE_PYTHON="0").split()
    assert all(f.endswith(".so") for f in files), files


def test_the_built_parsers_gather_header_lines_in_c_whatever_httptools_is_installed() -> None:
    # llhttp is built into the C module: another httptools (a newer one on a fresh install)
    # changes nothing but the exception classes, which are its own
    require_compiled()
    code = ("import httptools\nhttptools.__version__ = '9.9.9'\n"
            "import sidecar.http.wire as m, sidecar.http._wire as c\n"
            "print(m.GATHERS_HEADERS, m.HEAD is c.head, c.LLHTTP_VERSION)")
    assert run_python(code, PAKE_PURE_PYTHON="0") == "True True 9.4.3"


def test_llhttp_is_built_to_scan_header_values_with_the_simd_this_cpu_has() -> None:
    # with SSE4.2, llhttp reads a header value 16 bytes a step (a realistic request head 6.4k
    # -> 3.4k instructions); httptools' wheels are built without it
    require_compiled()
    options = compiled.WireOptions.for_build()
    expected = options.simd or ("neon" if os.uname().machine == "aarch64" else "")
    assert run_python("import sidecar.http._wire as c\nprint(repr(c.LLHTTP_SIMD))", PAKE_PURE_PYTHON="0") == repr(expected)


def test_sse42_is_asked_of_gcc_only_on_a_cpu_that_has_it() -> None:
    on_x86 = os.uname().machine.lower() in ("x86_64", "amd64")
    has = "flags\t: fpu sse2 ssse3 sse4_1 sse4_2 popcnt avx"
    assert compiled.has_sse42(has) == on_x86
    assert not compiled.has_sse42("flags\t: fpu sse2 ssse3 sse4_1 popcnt")
    assert not compiled.has_sse42("flags\t: fpu sse4_2x popcnt")  # a flag is a whole word
    gcc = compiled.WireOptions.for_build(compiler="gcc -pthread", linker="gcc -shared", cpu_flags=has)
    assert (gcc.simd, gcc.define_macros) == (("sse4.2", [("PAKE_LLHTTP_SSE42", "1")]) if on_x86 else ("", []))
    clang = compiled.WireOptions.for_build(compiler="clang", linker="clang -shared", cpu_flags=has)
    assert (clang.simd, clang.lto) == ("", False)  # its target pragma is not GCC's
    # never a flag for the whole module: its import checks the CPU before anything runs
    assert not [flag for flag in gcc.extra_compile_args if flag.startswith("-m")]


def test_llhttp_is_linked_with_its_wrappers_inlined_only_when_gcc_compiles_and_links() -> None:
    both = compiled.WireOptions.for_build(compiler="/usr/bin/x86_64-linux-gnu-gcc", linker="gcc -shared -L/x")
    assert both.lto and "-ffat-lto-objects" in both.extra_compile_args  # a plugin-less linker links it too
    assert not compiled.WireOptions.for_build(compiler="gcc", linker="ld -shared").lto
    assert not compiled.WireOptions.for_build(compiler="gcc", linker="gcc -shared", lto=False).lto
    assert not compiled.WireOptions.for_build(compiler="", linker="").lto


def test_a_compiler_is_gcc_by_its_name_or_what_its_name_links_to(tmp_path: Path) -> None:
    (tmp_path / "x86_64-linux-gnu-gcc-12").write_text("#!/bin/sh\n")
    (tmp_path / "x86_64-linux-gnu-gcc-12").chmod(0o755)
    (tmp_path / "cc").symlink_to(tmp_path / "x86_64-linux-gnu-gcc-12")  # as Debian's alternatives
    (tmp_path / "clang-16").write_text("#!/bin/sh\n")
    (tmp_path / "clang-16").chmod(0o755)
    (tmp_path / "c99").symlink_to(tmp_path / "clang-16")
    assert compiled.is_gcc(f"{tmp_path}/cc -pthread") and compiled.is_gcc("gcc -shared")
    assert not compiled.is_gcc(f"{tmp_path}/c99") and not compiled.is_gcc("clang") and not compiled.is_gcc("")
    # past a launcher and environment assignments, as setuptools runs them
    assert compiled.is_gcc("ccache gcc") and compiled.is_gcc("CCACHE_DIR=/x ccache x86_64-linux-gnu-gcc-12 -O2")
    assert compiled.is_gcc(f"env CC=1 {tmp_path}/cc") and not compiled.is_gcc("ccache clang")
    assert not compiled.is_gcc("gccgo") and not compiled.is_gcc("ccache")


def test_the_built_wire_module_loads_in_a_fresh_interpreter() -> None:
    # what the build checks before it says it is done (and builds again without -flto when not)
    require_compiled()
    assert compiled.wire_refused() == ""


def test_the_vendored_llhttp_is_the_one_of_the_installed_httptools() -> None:
    # the pure form parses with httptools' llhttp, the compiled one with http/llhttp/: a newer
    # httptools (a fresh install) may carry another llhttp, and the two forms would differ
    import httptools

    if httptools.__version__ != compiled.LLHTTP_FROM_HTTPTOOLS:
        why = (f"httptools is {httptools.__version__}, sidecar/http/llhttp/ is the llhttp of "
               f"{compiled.LLHTTP_FROM_HTTPTOOLS}: copy its sdist's vendor/llhttp there "
               f"(sidecar/http/llhttp/README.md) and set compiled.LLHTTP_FROM_HTTPTOOLS")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


# Dataclasses of the compiled hot path that keep the generated (interpreted) ``__init__``: each
# is made when a config or a breaker state changes (``FaultAction``: only when a configured
# fault fires), never for every request; so is every class of ``sidecar.config`` (made when a
# config is parsed). A class made per
# request writes its ``__init__`` out (``Exchange``), or every request pays an interpreted call.
MADE_AT_CONFIG_TIME = {
    "sidecar.listener.connection.ServerState", "sidecar.listener.connection.ListenerContext",
    "sidecar.routing.route_table.RouteTable", "sidecar.upstream.cluster.Cluster",
    "sidecar.upstream.circuit_breaker.Admission", "sidecar.upstream.circuit_breaker.Rejection",
    "sidecar.upstream.endpoint.EndpointState", "sidecar.upstream.retry.RetryDecision",
    "sidecar.filters.fault.FaultAction",
}

INTERPRETED_INITS = """
import dataclasses, importlib, inspect, json, sys
from pathlib import Path
from sidecar import compiled
root = Path(compiled.__file__).parent.parent
found, forms = [], set()
for source in compiled.sources():
    module = importlib.import_module(".".join(source.relative_to(root).with_suffix("").parts))
    forms.add(Path(module.__file__).suffix)
    for name, cls in vars(module).items():
        if (inspect.isclass(cls) and cls.__module__ == module.__name__ and dataclasses.is_dataclass(cls)
                and inspect.isfunction(cls.__init__)):
            found.append(f"{module.__name__}.{name}")
print(json.dumps({"forms": sorted(forms), "interpreted": sorted(found)}))
"""


def test_no_class_made_per_request_runs_an_interpreted_init_when_compiled() -> None:
    require_compiled()
    seen = json.loads(run_python(INTERPRETED_INITS, PAKE_PURE_PYTHON="0"))
    assert seen["forms"] == [".so"]
    per_request = {name for name in seen["interpreted"]
                   if name not in MADE_AT_CONFIG_TIME and not name.startswith("sidecar.config.")}
    assert not per_request, f"{sorted(per_request)}: write the __init__ out (see Exchange.__init__)"


# Module-level names of compiled modules that are not constants: type aliases and loggers.
NOT_CONSTANTS = {"log", "Stage", "Decision", "TransitionCallback", "EjectionCallback",
                 "ClusterSource", "_Handed", "PoolKey", "Address", "Mode", "T",
                 "SampledStart",
                 "__all__"}


def test_every_module_constant_of_the_compiled_form_is_final() -> None:
    # Compiled, a module-level name without ``Final`` is a look-up in the module's dict each
    # time it is read (~130 instructions; 34 of them a request head when the header codes were
    # unpacked from ``range``); a Final one is a C constant or static.
    loose = []
    for source in compiled.sources():
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.Assign):
                names = [e.id for t in node.targets
                         for e in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(e, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and "Final" not in ast.unparse(node.annotation):
                names = [node.target.id]
            else:
                continue
            loose += [f"{source.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n not in NOT_CONSTANTS]
    assert not loose, f"declare these Final: {loose}"


def test_no_compiled_module_adds_to_an_item_in_place() -> None:
    # Compiled, ``counts[i] += 1`` on a ``list[int]`` boxes both sides and calls the generic
    # ``PyNumber_InPlaceAdd`` (~150-270 instructions, callgrind: four an exchange in the
    # metrics and the breaker's window); ``counts[i] = counts[i] + 1`` is a native add.
    found = [f"{source.relative_to(ROOT)}:{node.lineno}"
             for source in compiled.sources()
             for node in ast.walk(ast.parse(source.read_text()))
             if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Subscript)]
    assert not found, f"write these as x[i] = x[i] + y: {found}"
