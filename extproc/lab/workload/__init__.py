"""The growth lab's workload: a YAML model of who calls and how (:mod:`.model`), and a
deterministic generator of planned requests from it (:mod:`.generator`, :mod:`.plan`).

    from extproc.lab.workload import example, generate
    plan = generate(example("clinical"), scale=2.0, seed=7)

The YAML reference is ``extproc/lab/workload/README.md``.
"""

from extproc.lab.workload.generator import generate
from extproc.lab.workload.model import Workload, WorkloadError, example, example_names, examples_dir, load_workload
from extproc.lab.workload.plan import KINDS, PlannedRequest, RetryPolicy

__all__ = ["generate", "Workload", "WorkloadError", "load_workload", "example", "example_names", "examples_dir",
           "PlannedRequest", "RetryPolicy", "KINDS"]
