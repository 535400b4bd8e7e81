"""llama.cpp for GGUF export and evaluation: the pinned llama-cpp-python, built once per machine.

PyPI ships llama-cpp-python as source only. Its sdist vendors llama.cpp, including the converter
(`convert_hf_to_gguf.py`, its `conversion/` package and its own `gguf-py`, which the PyPI `gguf`
package does not replace). `ensure()` downloads the sdist (pinned sha256), builds a wheel with
explicit CPU flags, and keeps wheel and converter in $SPECIALIST_CACHE/llama.cpp/<key>/, keyed by
version, build flags and machine, so fresh clones, CI and later runs reuse them; then it installs
the wheel into the running environment.

Build flags: `CMAKE_ARGS` from the environment when set (CUDA users: `CMAKE_ARGS="-DGGML_CUDA=on"`),
else, on x86-64, each instruction set this CPU reports (/proc/cpuinfo), named explicitly: AVX2/FMA/F16C
(x86-64-v3) and, where present, AVX-512 with VBMI/VNNI. Not llama.cpp's default -march=native: that
wheel can crash with SIGILL on another CPU (a cache in a home folder shared by cluster nodes), and here
it segfaulted outright (its AMX path). The flags name the cache folder, so a CPU with other features
gets a build of its own. Measured on this machine's CPU: the AVX-512 build answers a SmolLM2 request
1.3-1.5x faster than the AVX2-only one.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.files import cache_root
from pipeline.processes import environment_lock, shared_lock

VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# (the /proc/cpuinfo flags an option needs, the ggml option); AVX-512 extensions only on top of AVX-512.
X86_OPTIONS = (
    (("sse4_2",), "SSE42"),
    (("avx",), "AVX"),
    (("avx2",), "AVX2"),
    (("fma",), "FMA"),
    (("f16c",), "F16C"),
    (("bmi2",), "BMI2"),
    (("avx_vnni",), "AVX_VNNI"),
    (("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), "AVX512"),
    (("avx512vbmi",), "AVX512_VBMI"),
    (("avx512_vnni",), "AVX512_VNNI"),
    (("avx512_bf16",), "AVX512_BF16"),
)
# The multimodal (llava/mtmd) library is not needed to run or convert text models; skipping it saves build time.
COMMON_ARGS = ["-DLLAVA_BUILD=OFF"]


def cmake_args() -> list[str]:
    """The build flags: the user's CMAKE_ARGS, else this CPU's instruction sets, each named explicitly."""
    user = os.environ.get("CMAKE_ARGS", "").split()
    if user:
        return [*COMMON_ARGS, *user]
    args = [*COMMON_ARGS, "-DGGML_NATIVE=OFF"]
    if platform.machine() not in ("x86_64", "AMD64"):
        return args
    cpu = _cpu_flags()
    for needed, option in X86_OPTIONS:
        enabled = set(needed) <= cpu and (not option.startswith("AVX512_") or "-DGGML_AVX512=ON" in args)
        args.append(f"-DGGML_{option}={'ON' if enabled else 'OFF'}")
    return args


def install_dir() -> Path:
    """Where this build's wheel and converter are cached: one folder per version, flags and machine."""
    key = hashlib.sha256(" ".join([VERSION, platform.machine(), *cmake_args()]).encode()).hexdigest()[:12]
    return cache_root() / "llama.cpp" / f"{VERSION}-{key}"


def converter_script() -> Path:
    return install_dir() / "converter" / "convert_hf_to_gguf.py"


def lora_converter_script() -> Path:
    """convert_lora_to_gguf.py, beside the model converter (it imports the same conversion/ and gguf-py/)."""
    return install_dir() / "converter" / "convert_lora_to_gguf.py"


# llama.cpp's reference vocabularies (vocab-only GGUFs it tests its tokenizers on): each model family's real
# tokenizer, offline, for the tiny models the architecture tests build (pipeline/testing/tiny_models.py)
VOCABS = ("llama-spm", "llama-bpe", "phi-3", "qwen2")


def vocab_file(name: str) -> Path:
    return install_dir() / "converter" / "vocab" / f"ggml-vocab-{name}.gguf"


def _converters_cached() -> bool:
    return (
        converter_script().is_file()
        and lora_converter_script().is_file()
        and all(vocab_file(name).is_file() for name in VOCABS)
    )


def missing_build_tools() -> list[str]:
    """What a build would need and this machine lacks; empty when llama.cpp is installed or cached already."""
    if is_ready():
        return []
    if _cached_wheel(install_dir()) and _converters_cached():
        return []
    return [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]


def is_ready() -> bool:
    """This build (version and flags) is what `import llama_cpp` loads, and its converter is in the cache."""
    marker = _build_marker()
    return (
        _installed_version() == VERSION
        and marker is not None
        and marker.is_file()
        and marker.read_text() == install_dir().name
        and _converters_cached()
    )


def ensure() -> Path:
    """Make `import llama_cpp` work at VERSION and the converter available; returns the converter script.

    Builds only when this machine has no cached wheel for these flags. A lock makes two runs that start
    at once wait for one build instead of racing.
    """
    folder = install_dir()
    if is_ready():
        return converter_script()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with shared_lock(folder.parent / f".{folder.name}.lock", f"building llama-cpp-python {VERSION}"):
        wheel = _cached_wheel(folder)
        if wheel is None or not converter_script().is_file():
            _build(folder)
            wheel = _cached_wheel(folder)
        elif not _converters_cached():  # a cache from before the adapter converter (and vocabularies) were kept
            _refresh_converters(folder)
        if not is_ready():
            _log(f"installing {wheel.name} from {folder}")
            with environment_lock():
                _pip("install", "--no-deps", "--force-reinstall", wheel)
            importlib.invalidate_caches()
            # which build is installed: another CPU's flags or CMAKE_ARGS must not reuse this one
            _build_marker().write_text(folder.name)
    if not is_ready():
        raise PipelineError(f"llama-cpp-python {VERSION} was installed from {folder} but cannot be found")
    return converter_script()


def _download_sdist(tmp: Path) -> Path:
    requirements = tmp / "requirements.txt"
    requirements.write_text(f"llama-cpp-python=={VERSION} --hash=sha256:{SDIST_SHA256}\n")
    _pip("download", "--no-deps", "--no-binary", ":all:", "--require-hashes", "-r", str(requirements), "-d", str(tmp))
    requirements.unlink()
    return next(tmp.glob("llama_cpp_python-*.tar.gz"))


def _refresh_converters(folder: Path) -> None:
    """The converters from the pinned sdist into a cache whose wheel is built already (no rebuild)."""
    _log(f"adding llama.cpp's converters from the llama-cpp-python {VERSION} sdist to {folder}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _extract_converter(_download_sdist(tmp), tmp / "converter")
        old = folder / ".converter-old"
        shutil.rmtree(old, ignore_errors=True)
        if (folder / "converter").exists():
            os.replace(folder / "converter", old)
        os.replace(tmp / "converter", folder / "converter")
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_wheel(folder: Path) -> Path | None:
    return next(folder.glob("llama_cpp_python-*.whl"), None)


def _build_marker() -> Path | None:
    """A file inside the installed llama_cpp package naming the cache folder it was installed from."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / ".specialist-build"


def _build(folder: Path) -> None:
    args = cmake_args()
    _log(f"building llama-cpp-python {VERSION} once for this machine ({' '.join(args)}); about 3 min on 2 cores")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        sdist = _download_sdist(tmp)
        _extract_converter(sdist, tmp / "converter")
        env = {**os.environ, "CMAKE_ARGS": " ".join(args), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
        log_path = tmp / "build.log"
        with log_path.open("w") as log_file:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", str(sdist), "-w", str(tmp)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if done.returncode != 0:
            kept = folder.parent / f"build-failed-{folder.name}.log"
            shutil.copy(log_path, kept)
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise PipelineError(
                f"building llama-cpp-python {VERSION} failed (log: {kept}); it needs cmake and a C++ compiler "
                f"(Debian: apt-get install cmake g++). Last lines:\n{tail}"
            )
        sdist.unlink()
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_converter(sdist: Path, out: Path) -> None:
    """convert_hf_to_gguf.py and convert_lora_to_gguf.py with the conversion/ and gguf-py/ they import, as
    vendored in the sdist, and the reference vocabularies (VOCABS) into vocab/."""
    wanted = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
    vocabs = {f"models/ggml-vocab-{name}.gguf" for name in VOCABS}
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            _, _, inner = member.name.partition("/vendor/llama.cpp/")
            if inner and member.isfile() and (inner.startswith(wanted) or inner in vocabs):
                member.name = inner.replace("models/", "vocab/", 1) if inner in vocabs else inner
                archive.extract(member, out, filter="data")
    for script in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
        if not (out / script).is_file():
            raise PipelineError(f"{sdist.name}: no vendor/llama.cpp/{script} inside; the sdist changed")


def _installed_version() -> str | None:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def _pip(*args) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        last = "\n".join(done.stderr.strip().splitlines()[-5:]) or "(no output)"
        raise PipelineError(f"pip {args[0]} for llama-cpp-python {VERSION} failed (it needs PyPI once):\n{last}")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _log(message: str) -> None:
    print(f"[llama.cpp] {message}", file=sys.stderr, flush=True)
