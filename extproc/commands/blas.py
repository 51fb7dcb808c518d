"""Which OpenBLAS kernels NumPy should use: chosen before NumPy is first imported.

OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when the library loads, so the choice is made by the
``extproc`` command before anything imports NumPy, and passed to the Triton model processes in
their environment. No NumPy import here.
"""

from __future__ import annotations


from extproc import environment


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def openblas_coretype(env: dict[str, str], cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS kernel to ask for, or None to leave OpenBLAS's own detection alone.

    OpenBLAS picks its kernels from the CPU's family and model; on virtual machines that hide them
    it falls back to ``Prescott`` (SSE3), which ran the reference LLM tiers 2-3x slower than the
    AVX2 ``Haswell`` kernels on a 2-vCPU Xeon (AVX-512) test machine, and the gateway's MiniLM
    encoder 1.3-2.3x slower. So when the environment does
    not choose (``OPENBLAS_CORETYPE`` unset) and the CPU has AVX2 and FMA, ask for ``Haswell``: the
    AVX2 kernels any such CPU runs correctly (AVX-512 kernels are not chosen here). An explicit
    ``OPENBLAS_CORETYPE`` always wins; ``EXTPROC_OPENBLAS_CORETYPE`` names another kernel, or
    ``auto`` leaves OpenBLAS's own detection alone.
    """
    choice = env.get(environment.EXTPROC_OPENBLAS_CORETYPE, "")
    if env.get(environment.OPENBLAS_CORETYPE) or choice == "auto":
        return None
    if choice:
        return choice
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = _cpu_flags(cpuinfo)
    return "Haswell" if {"avx2", "fma"} <= flags else None


def prefer_fast_kernels(env: dict | None = None) -> str | None:
    """Set ``OPENBLAS_CORETYPE`` in ``env`` (default: this process's environment, so its NumPy and
    the processes it starts) when :func:`openblas_coretype` asks for a kernel; returns it."""
    env = environment.process_environ() if env is None else env
    coretype = openblas_coretype(dict(env))
    if coretype:
        env[environment.OPENBLAS_CORETYPE] = coretype
    return coretype
