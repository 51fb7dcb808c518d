"""llm-medium: CPU reference LLM tier (NumPy, random weights) -- see triton_models/README.md."""

import os
import sys
from pathlib import Path


def _extend_sys_path() -> None:
    # The Python backend stub ignores PYTHONPATH; extproc.commands.tritonserver exports the venv's
    # site-packages in EXTPROC_TRITON_SYS_PATH.  The repository dir holds the reference_llm package.
    entries = [p for p in os.environ.get("EXTPROC_TRITON_SYS_PATH", "").split(os.pathsep) if p]
    entries.append(str(Path(__file__).resolve().parents[2]))
    for p in reversed(entries):
        if p not in sys.path:
            sys.path.insert(0, p)


_extend_sys_path()

from reference_llm.triton_backend import TritonPythonModel  # noqa: E402,F401
