"""server.blas_threads: each gateway worker pins its BLAS pool (extproc/serving/blas_threads.py)."""

import subprocess
import sys

from extproc.framework.config import load_config
from extproc.serving.blas_threads import wanted_blas_threads


def test_one_thread_by_default_unless_the_environment_chose():
    assert load_config(None).server.blas_threads == 1
    assert wanted_blas_threads(1, {}) == 1
    assert wanted_blas_threads(3, {}) == 3
    assert wanted_blas_threads(0, {}) is None                             # the library's choice
    assert wanted_blas_threads(1, {"OPENBLAS_NUM_THREADS": "2"}) is None  # the operator chose
    assert wanted_blas_threads(1, {"OMP_NUM_THREADS": "4"}) is None


def test_the_limit_is_applied_to_numpys_blas():
    code = ("from extproc.serving.blas_threads import limit_blas_threads as f; "
            "from threadpoolctl import threadpool_info as i; "
            "n = f(1); print(n, min(x['num_threads'] for x in i() if x['user_api'] == 'blas'))")
    env = {"PATH": "/usr/bin:/bin"}  # no OPENBLAS_NUM_THREADS from the test's own environment
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["1", "1"]
