"""Builds the dropmuon package and its torch extension `dropmuon._C`.

The C core (csrc/core/*.c) is compiled as C11 into a static library of its own, so that none
of the C++ flags torch adds reach it, then linked into the extension with the ATen shim
(csrc/torch/*.cpp). Install with `pip install -e . --no-build-isolation` (the extension must
be built against the torch that is installed, not a fresh one in an isolated environment).

With a CUDA build of torch (torch.version.cuda set) and nvcc found (CUDA_HOME), the extension
is a CUDAExtension that adds the CUDA kernels (csrc/cuda/*.cu) and their ATen shim
(csrc/torch/cuda.cu); otherwise the CPU-only CppExtension. DROPMUON_CUDA=0 forces the CPU one.
The GPU architectures follow TORCH_CUDA_ARCH_LIST (default: the visible GPUs; "9.0" for Hopper).
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


core_library = (
    "dropmuon_core",
    {
        "sources": sources("csrc/core/*.c"),
        "include_dirs": ["csrc/include", "csrc/core"],
        "cflags": [
            "-std=c11",
            "-O3",
            "-fPIC",
            "-ffp-contract=off",
            "-fvisibility=hidden",  # only dropmuon.h's DM_API functions leave the extension
            "-Wall",
            "-Wextra",
        ],
    },
)

# at::parallel_for is inline OpenMP in torch's CPU build: without -fopenmp the shim's passes
# would run on one thread. The extension then uses the libgomp.so.1 torch has already loaded.
CXX_FLAGS = ["-O3", "-Wall", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]

WITH_CUDA = (
    torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.environ.get("DROPMUON_CUDA", "1") != "0"
)

if WITH_CUDA:
    # The kernels (csrc/cuda) include the core's internal.h for its checks and size arithmetic.
    extension = CUDAExtension(
        name="dropmuon._C",
        sources=sources("csrc/torch/*.cpp") + sources("csrc/*/*.cu"),
        include_dirs=[os.path.join(ROOT, "csrc/include"), os.path.join(ROOT, "csrc/core")],
        extra_compile_args={
            "cxx": CXX_FLAGS,
            "nvcc": ["-O3", "-lineinfo"],  # -std: torch picks the one its headers need
        },
        extra_link_args=LINK_FLAGS,
        libraries=["dropmuon_core"],
    )
else:
    extension = CppExtension(
        name="dropmuon._C",
        sources=sources("csrc/torch/*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc/include")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_FLAGS,
        libraries=["dropmuon_core"],
    )

setup(
    name="dropmuon",
    version="0.1.0",
    description="Drop-Muon: Muon-style layer-wise updates with randomized backprop truncation",
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"dropmuon.compare": ["datasets/mnist-10k/*"]},
    libraries=[core_library],
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.9"],  # the library needs torch alone
    # The comparison harness (pip install dropmuon[compare]): plots, progress bars, and numpy,
    # which no module imports but unpickling the cifar10 batches (numpy arrays) does.
    extras_require={
        "compare": ["matplotlib", "tqdm", "numpy"],
        # dropmuon.compare.baselines: pinned releases that accept torch 2.13.0 as installed.
        "baselines": ["muon-optimizer==0.1.0", "pytorch-optimizer==4.1.0"],
    },
    entry_points={"console_scripts": ["dropmuon-compare=dropmuon.compare.cli:main"]},
)
