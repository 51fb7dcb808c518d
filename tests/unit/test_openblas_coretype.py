"""Which OpenBLAS kernels the Triton model processes are asked to use."""

from __future__ import annotations

import os

from extproc.commands.blas import openblas_coretype, prefer_fast_kernels
from extproc.commands.tritonserver import triton_env

AVX2 = "processor : 0\nflags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx avx2 avx512f\n"
OLD = "processor : 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx\n"


def test_unset_on_an_avx2_cpu_asks_for_the_avx2_kernels():
    assert openblas_coretype({}, AVX2) == "Haswell"


def test_a_cpu_without_avx2_is_left_to_openblas():
    assert openblas_coretype({}, OLD) is None


def test_the_environments_own_choice_always_wins():
    assert openblas_coretype({"OPENBLAS_CORETYPE": "SkylakeX"}, AVX2) is None
    if "OPENBLAS_CORETYPE" in os.environ:
        assert triton_env([])["OPENBLAS_CORETYPE"] == os.environ["OPENBLAS_CORETYPE"]


def test_extproc_variable_names_another_kernel_or_leaves_detection_alone():
    assert openblas_coretype({"EXTPROC_OPENBLAS_CORETYPE": "Zen"}, AVX2) == "Zen"
    assert openblas_coretype({"EXTPROC_OPENBLAS_CORETYPE": "auto"}, AVX2) is None


def test_the_command_sets_it_for_itself_and_what_it_starts():
    env: dict[str, str] = {}
    chosen = prefer_fast_kernels(env)
    assert env.get("OPENBLAS_CORETYPE") == chosen  # None on a CPU without AVX2: nothing set
    assert prefer_fast_kernels({"OPENBLAS_CORETYPE": "Zen"}) is None
