"""Build the CUDA kernels for the host emulation: csrc/cuda/*.cu compiled with g++ against
csrc/cuda/emu/cuda_runtime.h (every CUDA thread a std::thread, __syncthreads a barrier, shuffles through an
exchange buffer) into one shared library that tests/test_cuda_emulated.py loads with ctypes.

    python csrc/cuda/emu/build_emu.py OUT_DIR        # prints the library's path

The library's name carries a hash of every source it is built from, so an unchanged tree is not rebuilt.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2]


class EmulationUnavailable(RuntimeError):
    """No C++ compiler, or one without the C++20 <barrier>/std::atomic_ref the emulation needs."""


_LAUNCH = re.compile(r"^(\s*)(.+?)<<<(.+)>>>\((.*)\);\s*$")
_EXTERN = re.compile(r"extern __shared__ (.+?) (\w+)\[\];")
_STATIC = re.compile(r"^(\s*)__shared__ (.+?);\s*$")
_DECL = re.compile(r"(\w+)\s*(\[.*)$")


def _split_top(text: str) -> list[str]:
    """Split declarators at the commas outside brackets: `a[N], b[M + 1]` -> ["a[N]", "b[M + 1]"]."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[(<"
        depth -= ch in "])>"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _static_shared(m: re.Match) -> str:
    """`__shared__ T a[N][M], b[N];` -> static storage plus a checked view of each array (emu::Smem)."""
    indent, body = m[1], m[2]
    first = re.search(r"\w+\s*\[", body)
    if first is None:  # a scalar: nothing to index, it stays a block-wide static
        return f"{indent}static {body};"
    ctype, out = body[:first.start()].strip(), []
    align = re.search(r"__align__\((\d+)\)", ctype)
    for decl in _split_top(body[first.start():]):
        d = _DECL.match(decl)
        if d is None:
            raise ValueError(f"build_emu: cannot read the __shared__ declaration {m[0].strip()!r}")
        out.append(f"static {ctype} {d[1]}__emu{d[2]}; auto {d[1]} = ::emu::static_smem({d[1]}__emu, \"{d[1]}\""
                   f"{', ' + align[1] if align else ''});")
    return indent + " ".join(out)


def sources() -> dict[str, str]:
    """The .cu files with `k<<<g, b, s, st>>>(args)` turned into emu::launch("k", k, g, b, s, st, args), every
    shared array (`extern __shared__ T x[]` and `__shared__ T x[N]...`) into a bounds-checked emu::Smem view of
    its allocation, and `reinterpret_cast` into emu::ptr_cast, which keeps a shared pointer checked."""
    out = {}
    for f in sorted((CSRC / "cuda").glob("*.cu")):
        lines = []
        for line in f.read_text().splitlines():
            m = _LAUNCH.match(line)
            if m:
                line = f'{m[1]}::emu::launch("{m[2].strip()}", {m[2]}, {m[3]}, {m[4]});'
            line = _EXTERN.sub(lambda m: f'auto {m[2]} = ::emu::dyn_smem<{m[1]}>("{m[2]}");', line)
            line = _STATIC.sub(_static_shared, line)
            if "__shared__" in line and "[" in line.split("//")[0]:  # an array the rewrite missed: no silent gap
                raise ValueError(f"build_emu: {f.name}: put the __shared__ array on a line of its own: {line.strip()!r}")
            lines.append(line.replace("reinterpret_cast<", "::emu::ptr_cast<"))
        out[f.stem + ".emu.cpp"] = "\n".join(lines) + "\n"
    return out


def build(out_dir: Path) -> Path:
    """The emulation library under ``out_dir`` (built if missing); EmulationUnavailable if it cannot be."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        raise EmulationUnavailable("no C++ compiler for the CUDA emulation")
    srcs = sources()
    digest = hashlib.sha256()
    for name in sorted(srcs):
        digest.update(srcs[name].encode())
    for f in sorted((CSRC / "cuda").glob("*.h*")) + sorted((CSRC / "cuda" / "emu").glob("*")) + sorted(
            (CSRC / "include" / "auvcore").glob("*.h")):
        digest.update(f.read_bytes())
    build_dir = Path(out_dir) / f"cuda_emu_{digest.hexdigest()[:12]}"
    lib_path = build_dir / "libauvemu.so"
    if lib_path.exists():
        return lib_path
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++20", "-O1", "-pthread", "-fPIC", f"-I{CSRC / 'cuda' / 'emu'}", f"-I{CSRC / 'cuda'}",
             f"-I{CSRC / 'include'}"]
    jobs = []
    for name, text in srcs.items():
        (build_dir / name).write_text(text)
        jobs.append(subprocess.Popen([cxx, *flags, "-D__CUDACC__", "-c", str(build_dir / name), "-o",
                                      str(build_dir / (name + ".o"))], stderr=subprocess.PIPE, text=True))
    jobs.append(subprocess.Popen([cxx, *flags, "-c", str(CSRC / "cuda" / "emu" / "emu_harness.cpp"), "-o",
                                  str(build_dir / "harness.o")], stderr=subprocess.PIPE, text=True))
    errors = [err for j in jobs for _, err in [j.communicate()] if j.returncode != 0]
    if errors and any(("barrier" in e or "atomic_ref" in e) for e in errors):
        raise EmulationUnavailable("the C++ compiler lacks C++20 <barrier>/std::atomic_ref needed by the CUDA emulation")
    if errors:
        raise RuntimeError("emulated build failed:\n" + errors[0][-4000:])
    subprocess.run([cxx, "-shared", "-pthread", "-o", str(lib_path), *map(str, build_dir.glob("*.o"))], check=True)
    return lib_path


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "build/emu")))
