"""The hot path's compiled form: the data-plane modules built with mypyc beside their source.

Why: the sidecar's cost per request is the Python of an exchange and the event loop's callbacks
around it, spread over ~60 functions with no single hot spot (bench/README.md). mypyc compiles
the typed modules unchanged into C extensions: about half the Python per exchange, and one hop
goes from 0.23x to 0.39x of HAProxy's req/s (docs/benchmarks.md).

How it is used: ``python -m sidecar.compiled build`` writes one extension module next to each
module ``GROUPS`` names, plus each group's shared library (``sidecar/_compiled*__mypyc*.so``).
Python's import takes an extension module before a source file in the same directory, so every
entry point (``pake-sidecar``, ``make demo``, ``make bench``) runs the compiled form once it is
built, with nothing to configure. The ``.py`` files stay the fallback: without a C compiler the
build says so and the sidecar runs as Python; ``PAKE_PURE_PYTHON=1`` makes ``sidecar`` load its
sources even where extensions sit beside them (the tests run both forms; a traceback through
source is easier to read).

Beside the mypyc libraries, the build compiles one C module of our own: ``http/_wire.c``, the
HTTP/1.1 wire where a Python call a header line was the cost (``http/wire.py``): a head's
header lines reach the parsers as one list (llhttp driven from C: the llhttp httptools
carries, built into it with SSE4.2 where the CPU has it, ``http/llhttp/README.md``), and are
written by one call; and the TLS records under them are read and written with the GIL held
(``http/_tls_records.c``).

A compiled module older than its source would run code that is no longer there: ``stale()``
finds them, ``build --if-stale`` rebuilds, the test session refuses to start with them and the
sidecar logs ``compiled_form_stale``. Every module is rebuilt on each build.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final

__all__ = ["GROUPS", "PURE_ENV", "SourceOnlyFinder", "clean", "compiled_modules", "expected_form",
           "extension_of", "form", "group_libraries", "groups", "loaded_form", "main",
           "pure_requested", "sources", "stale"]

PURE_ENV = "PAKE_PURE_PYTHON"

# Two libraries. The first holds what every sidecar imports: the exchange's path (what
# bench/hotpath.py measures), the filter chain, the access log line and the audit record. The
# second holds the policy filters, loaded only by a sidecar whose service has a policy (a
# library initialises the constants of all its modules when it loads). An idle plain sidecar
# measured 36.0 MB RSS with one library and 36.2 MB with two: the split keeps the policy code
# out of such a sidecar, not megabytes. Everything else (config parsing, control client, TLS
# set-up, admin) runs once per snapshot or off the hot path.
GROUPS: dict[str, tuple[str, ...]] = {
    "sidecar._compiled": (
        "http",
        "listener",
        "routing",
        "upstream",  # but its health_check.py: see _LEFT_AS_PYTHON
        "pipeline.py",
        "snapshot_slot.py",
        "exchange.py",
        "deadline.py",
        "observability/metrics.py",
        "observability/access_log.py",
        "observability/json_text.py",
        "observability/log_writer.py",  # a channel's put, once per log line
        "observability/trace_context.py",  # every exchange's trace ids while tracing is on
        "audit.py",
        "filters/chain.py",
        "filters/fault.py",
        # the config the exchange reads (routes, limits, timeouts, retries, faults): compiled,
        # its fields are read directly instead of by name (~30 reads per exchange)
        "config/model.py",
        "config/retries.py",
        "config/fault.py",
    ),
    "sidecar._compiled_policy": ("filters",),  # the rest of it
}

# health_check.py: off the per-request path, and compiled it lost a cancellation: a health
# checker stopped in the middle of a probe went on probing (its probe coroutine ran past a
# cancelled await, to an unbound local), so a retired cluster's checker never ended.
_LEFT_AS_PYTHON = frozenset({
    "upstream/health_check.py",
    # its runtime_checkable Protocol is no protocol class once compiled (TypeError on import)
    "filters/base.py",
})

# The HTTP/1.1 wire's C helpers (http/_wire.c, http/wire.py): C, not mypyc, built beside the
# libraries, with llhttp's sources (http/llhttp/: the copy httptools 0.9.0 carries) in them;
# its parser through http/_llhttp_parser.c, the one file built for SSE4.2; and the TLS records'
# reads and writes (http/_tls_records.c, upstream/tls_protocol.py).
WIRE_SOURCE = "http/_wire.c"
WIRE_SOURCES = (WIRE_SOURCE, "http/_llhttp_parser.c", "http/llhttp/api.c", "http/llhttp/http.c",
                "http/_tls_records.c")
WIRE_HEADERS = ("http/_tls_records.h",)
LLHTTP_FILES = ("http/llhttp/llhttp.c", "http/llhttp/api.c", "http/llhttp/http.c", "http/llhttp/llhttp.h")
# the httptools whose sdist's vendor/llhttp is http/llhttp/: the pure form parses with that
# httptools, so a test fails in CI when another is installed (copy its llhttp, set this)
LLHTTP_FROM_HTTPTOOLS = "0.9.0"

_PACKAGE = Path(__file__).resolve().parent
# what sysconfig's EXT_SUFFIX says, from the import system: ``sysconfig`` and its build-time
# data are ~0.15 MB of every running sidecar (only a build reads the compiler from them)
_EXT_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def groups(package: Path = _PACKAGE) -> dict[str, list[Path]]:
    """The source files of each library, in a stable order; a file in the first group that
    names it (packages' ``__init__`` stay Python)."""
    seen: set[Path] = set()
    out: dict[str, list[Path]] = {}
    for group, entries in GROUPS.items():
        files: list[Path] = []
        for entry in entries:
            path = package / entry
            if path.suffix == ".py":
                candidates = [path]
            else:
                candidates = [p for p in sorted(path.glob("*.py")) if p.name != "__init__.py"
                              and f"{entry}/{p.name}" not in _LEFT_AS_PYTHON]
            files.extend(p for p in candidates if p not in seen)
            seen.update(candidates)
        out[group] = files
    return out


def wire_inputs(package: Path = _PACKAGE) -> list[Path]:
    """What the wire's C helpers are made from: their sources, llhttp's files, and this
    module (it holds the build's options): any newer than the module makes it stale."""
    files = dict.fromkeys((*WIRE_SOURCES, *WIRE_HEADERS, *LLHTTP_FILES, "compiled.py"))
    return [package / name for name in files]


def has_sse42(cpu_flags: str | None = None) -> bool:
    """The CPU building is x86-64 with SSE4.2 (``/proc/cpuinfo``'s flags)."""
    if os.uname().machine.lower() not in ("x86_64", "amd64"):
        return False
    if cpu_flags is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpu_flags = next((line for line in f if line.startswith("flags")), "")
        except OSError:
            return False
    words = cpu_flags.split()
    return "sse4_2" in words and "popcnt" in words


_LAUNCHERS: Final = frozenset({"ccache", "sccache", "distcc", "env"})  # run the compiler named next


def is_gcc(command: str) -> bool:
    """``command`` (a compiler or linker command line, as setuptools gets it) runs GCC: by its
    name, or the name of what it links to (Debian's ``cc`` is GCC, macOS's is clang), past a
    launcher (``ccache gcc``) and environment assignments."""
    import shutil  # (the build's, not a running sidecar's: shutil is ~0.1 MB of imports)

    words = command.split()
    while words and (Path(words[0]).name in _LAUNCHERS or "=" in words[0]):
        words = words[1:]
    if not words:
        return False
    if _gcc_name(Path(words[0]).name):
        return True
    found = shutil.which(words[0])
    return found is not None and _gcc_name(Path(os.path.realpath(found)).name)


def _gcc_name(name: str) -> bool:
    return name == "gcc" or name.startswith("gcc-") or name.endswith("-gcc") or "-gcc-" in name


@dataclass(frozen=True)
class WireOptions:
    """How the wire's C helpers are compiled and linked (setuptools ``Extension`` arguments).

    - ``PAKE_LLHTTP_SSE42`` (GCC on a CPU with SSE4.2): ``_llhttp_parser.c`` builds llhttp's
      parser for SSE4.2, which then checks a header value 16 bytes a step (its
      ``_mm_cmpestri`` path; ARM builds have its NEON path by default), and the module's
      import checks the CPU (``cpuid``) before anything runs. Only that file: the rest of
      the module, its import first, has no instruction a CPU may lack.
    - ``-flto`` (GCC compiling and linking): llhttp's span and header wrappers (``api.c``,
      ``http.c``) are inlined into its parser, -1.6% of a realistic one hop's instructions.
      Fat objects: a linker without GCC's plugin links the plain code. ``main`` builds
      again without it when the module does not load.
    - ``-fvisibility=hidden``: llhttp's symbols stay the module's (calls without the PLT).
    """

    define_macros: list[tuple[str, str | None]]
    extra_compile_args: list[str]
    extra_link_args: list[str]

    @classmethod
    def for_build(cls, *, lto: bool = True, compiler: str | None = None, linker: str | None = None,
                  cpu_flags: str | None = None) -> WireOptions:
        import sysconfig  # (a build's, not a running sidecar's)

        if compiler is None:
            compiler = os.environ.get("CC") or str(sysconfig.get_config_var("CC") or "")
        if linker is None:
            linker = os.environ.get("LDSHARED") or str(sysconfig.get_config_var("LDSHARED") or "")
        gcc = is_gcc(compiler)
        macros: list[tuple[str, str | None]] = [("PAKE_LLHTTP_SSE42", "1")] if gcc and has_sse42(cpu_flags) else []
        flto = lto and gcc and is_gcc(linker)
        return cls(macros, ["-Wall", "-fvisibility=hidden", *(["-flto", "-ffat-lto-objects"] if flto else [])],
                   ["-flto", "-O3"] if flto else [])

    @property
    def simd(self) -> str:
        return "sse4.2" if self.define_macros else ""

    @property
    def lto(self) -> bool:
        return "-flto" in self.extra_link_args


def wire_module(package: Path = _PACKAGE) -> Path:
    """Where the built C helpers go: ``sidecar/http/_wire`` plus the extension suffix."""
    return extension_of(package / WIRE_SOURCE)


def sources(package: Path = _PACKAGE) -> list[Path]:
    """Every source file compiled."""
    return [path for files in groups(package).values() for path in files]


def extension_of(source: Path) -> Path:
    return source.with_name(source.stem + _EXT_SUFFIX)


def group_libraries(package: Path) -> list[Path]:
    return [package / f"{group.rpartition('.')[2]}__mypyc{_EXT_SUFFIX}" for group in GROUPS]


def compiled_modules(package: Path = _PACKAGE) -> list[Path]:
    """Every extension file in the package, the group libraries included (and any a build of
    an earlier module list left: it would still be imported)."""
    return sorted(package.rglob(f"*{_EXT_SUFFIX}"))


def stale(package: Path = _PACKAGE) -> list[Path]:
    """What makes the build on disk wrong, when any extension exists (none at all is the pure
    form, not a stale one): sources whose extension is missing or older than they are, a
    missing group library, extensions of modules no longer compiled."""
    present = compiled_modules(package)
    if not present:
        return []
    out = []
    libraries = group_libraries(package)
    expected = set(libraries)
    for source in sources(package):
        ext = extension_of(source)
        expected.add(ext)
        if not ext.exists() or ext.stat().st_mtime < source.stat().st_mtime:
            out.append(source)
    out.extend(library for library in libraries if not library.exists())
    source = package / WIRE_SOURCE
    if source.exists():  # (and llhttp's sources, built into it)
        wire = wire_module(package)
        expected.add(wire)
        newest = max(path.stat().st_mtime for path in wire_inputs(package))
        if not wire.exists() or wire.stat().st_mtime < newest:
            out.append(source)
    return out + [p for p in present if p not in expected]


def form(package: Path = _PACKAGE) -> str:
    """What the files on disk give: ``compiled``, ``python`` or ``stale``."""
    if not compiled_modules(package):
        return "python"
    return "stale" if stale(package) else "compiled"


def pure_requested() -> bool:
    """``PAKE_PURE_PYTHON=1``: this process (and the sidecars it starts) load the source."""
    return os.environ.get(PURE_ENV) == "1"


def expected_form(package: Path = _PACKAGE) -> str:
    """What a sidecar started from this environment runs: ``python`` when pure is requested,
    else what the files on disk give."""
    return "python" if pure_requested() else form(package)


def loaded_form(module: ModuleType) -> str:
    """What this process runs (``module``: one of the hot modules, already imported)."""
    return "python" if str(getattr(module, "__file__", "")).endswith(".py") else "compiled"


def clean(package: Path = _PACKAGE) -> int:
    """Remove the compiled form; returns how many files went."""
    files = compiled_modules(package)
    for path in files:
        path.unlink()
    return len(files)


class SourceOnlyFinder:
    """Finds ``package``'s modules among their source files only (``PAKE_PURE_PYTHON=1``).
    A meta path finder by its ``find_spec`` alone: ``importlib.abc`` would bring
    ``importlib.resources``, ``tempfile``, ``shutil`` and the compression modules into every
    sidecar (~0.5 MB of RSS), since ``sidecar.app`` imports this module."""

    def __init__(self, package: str) -> None:
        self.prefix = package + "."

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if path is None or not fullname.startswith(self.prefix):
            return None
        loaders = [(importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)]
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, *loaders).find_spec(fullname)
            if spec is not None:
                return spec
        # a module that is only an extension (the wire's C helpers) is not loaded either
        raise ModuleNotFoundError(f"{fullname}: {PURE_ENV}=1 loads the sources only", name=fullname)


# === the build ==========================================================================

class BuildFailed(Exception):
    pass


def build(package: Path = _PACKAGE, *, options: WireOptions | None = None) -> float:
    """Compile every module of ``GROUPS`` into ``package``, a library per group, and the wire's
    C helpers (``options``: this machine's by default); seconds it took. On failure nothing
    compiled is left behind: the sidecar then runs as Python."""
    import tempfile  # (the build's imports stay out of a running sidecar)
    import threading
    import time

    try:
        from mypyc.build import mypycify
        from setuptools import Distribution
    except ImportError as exc:  # the dev extras bring mypy (and mypyc with it)
        raise BuildFailed(f"mypyc is not installed ({exc})") from None
    root = package.parent
    separate: list[tuple[list[str], str | None]] = [
        ([str(s.relative_to(root)) for s in files], group) for group, files in groups(package).items()]
    started = time.monotonic()
    done = threading.Event()

    def ticker() -> None:  # a long build says it is still going
        while not done.wait(15):
            print(f"  ... {time.monotonic() - started:.0f} s", flush=True)

    threading.Thread(target=ticker, daemon=True).start()
    clean(package)
    cwd = os.getcwd()
    try:
        with tempfile.TemporaryDirectory(prefix="pake-mypyc-") as tmp:
            os.chdir(root)  # mypycify takes paths relative to the working directory
            try:
                paths = [path for files, _ in separate for path in files]
                extensions = mypycify(paths, opt_level="3", separate=separate, target_dir=tmp)
                if (package / WIRE_SOURCE).exists():
                    from setuptools import Extension

                    options = options or WireOptions.for_build()
                    extensions.append(Extension(
                        "sidecar.http._wire", [str(Path(package.name) / name) for name in WIRE_SOURCES],
                        define_macros=options.define_macros, extra_compile_args=options.extra_compile_args,
                        extra_link_args=options.extra_link_args))
                dist = Distribution({"name": "pake-mesh-hot-path", "ext_modules": extensions})
                cmd = dist.get_command_obj("build_ext")
                cmd.inplace = True
                cmd.build_temp = cmd.build_lib = tmp  # built there, then copied beside the source
                cmd.ensure_finalized()
                cmd.run()
            except (SystemExit, Exception) as exc:  # mypy errors exit; a missing gcc raises
                clean(package)
                raise BuildFailed(str(exc) or type(exc).__name__) from None
    finally:
        os.chdir(cwd)
        done.set()
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sidecar.compiled",
                                     description="The hot path's compiled form (mypyc).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the hot path with mypyc, next to its source")
    b.add_argument("--if-stale", action="store_true", help="only when missing or older than the source")
    b.add_argument("--required", action="store_true",
                   help="fail when it cannot be built (CI), instead of falling back to Python")
    sub.add_parser("check", help="say which form is on disk; exit 1 when stale")
    sub.add_parser("clean", help="remove the compiled form (the sidecar runs as Python)")
    args = parser.parse_args(argv)
    if args.command == "clean":
        print(f"removed {clean()} compiled files")
        return 0
    current = form()
    if args.command == "check":
        print(current, *(f"  stale: {p}" for p in stale()), sep="\n")
        return 1 if current == "stale" else 0
    if args.if_stale and current == "compiled":
        print(f"the hot path's compiled form is up to date ({len(sources())} modules)")
        return 0
    print(f"compiling the hot path with mypyc: {len(sources())} modules (about 90 s on 2 cores)...",
          flush=True)
    options = WireOptions.for_build()
    try:
        took = build(options=options)
        why = wire_refused()
        if why and options.lto:
            # a linker that took GCC's LTO objects and made a module without them
            print(f"the wire's C helpers built with -flto do not load ({why}): building again without it",
                  flush=True)
            options = WireOptions.for_build(lto=False)
            took += build(options=options)
            why = wire_refused()
    except BuildFailed as exc:
        print(f"could not compile the hot path ({exc}): the sidecar runs as pure Python", file=sys.stderr)
        return 1 if args.required else 0
    if why:
        print(f"the wire's C helpers do not load ({why}): the parsers call Python a header line",
              file=sys.stderr)
        return 1 if args.required else 0
    built = ", ".join([f"llhttp for {options.simd}" if options.simd else "llhttp"]
                      + (["LTO"] if options.lto else []))
    print(f"compiled {len(sources())} modules in {took:.0f} s, and the wire's C helpers ({built}): {form()}")
    return 0


def wire_refused(package: Path = _PACKAGE) -> str:
    """Why the built wire module does not import in a fresh interpreter, or "" when it does."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    result = subprocess.run([sys.executable, "-c", "import sidecar.http._wire"], cwd=package.parent,
                            env=env, capture_output=True, text=True, timeout=60)
    if result.returncode == 0:
        return ""
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


if __name__ == "__main__":
    sys.exit(main())
