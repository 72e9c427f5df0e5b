"""The C++ kernels of the fast paths, built on first use (then cached by torch) with the machine's own instructions."""

import functools
from pathlib import Path
from typing import Any


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
            name=f"hf_scratch_{name}", sources=[str(source)], extra_cflags=flags, is_python_module=python_module
        )
    except (OSError, RuntimeError, ImportError) as error:
        raise RuntimeError(
            f"hf_scratch.fast builds a small C++ kernel on first use and needs a C++ compiler (g++) and ninja "
            f"(`pip install ninja` or `apt-get install g++ ninja-build`); building {source} failed: {error}"
        ) from error
