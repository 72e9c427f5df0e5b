"""The C++ kernels of the fast paths, built on first use (then cached by torch) with the machine's own instructions."""

import functools
import hashlib
from pathlib import Path
from typing import Any


def machine_tag() -> str:
    """A short digest of the CPU's instruction-set flags. The kernels are compiled with `-march=native`, so a build
    belongs to the CPU kind it was made on: the tag in the extension's name keeps a cache folder shared by different
    machines (a network home directory) from loading another CPU's build, which could stop on an illegal
    instruction."""
    import torch

    flags = sorted(name for name, present in torch.cpu.get_capabilities().items() if present is True)
    return hashlib.sha256(" ".join(flags).encode()).hexdigest()[:8]


@functools.cache
def load(name: str, *, python_module: bool = True) -> Any:
    """Builds (once per machine) and loads `kernels/{name}.cpp`: its pybind11 module, or with `python_module=False`
    a library of dispatcher operators (`torch.ops...`), loaded into the process."""
    from torch.utils import cpp_extension

    source = Path(__file__).parent / f"{name}.cpp"
    try:
        # -fopenmp: ATen's parallel_for runs on OpenMP only when the extension is compiled with it.
        flags = ["-O3", "-march=native", "-fopenmp"]
        return cpp_extension.load(
            name=f"hf_scratch_{name}_{machine_tag()}",
            sources=[str(source)],
            extra_cflags=flags,
            is_python_module=python_module,
        )
    except (OSError, RuntimeError, ImportError) as error:
        raise RuntimeError(
            f"hf_scratch.fast builds a small C++ kernel on first use and needs a C++ compiler (g++) and ninja "
            f"(`pip install ninja` or `apt-get install g++ ninja-build`); building {source} failed: {error}"
        ) from error
