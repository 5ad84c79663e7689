"""Diagnostics: checks that exercise every layer of kvrelay on a real device, above all of them.

Owns: the GPU check (`python -m kvrelay.diagnostics.gpu_check`: gpu_check.py runs the kernel parts of
kvrelay/kernels/gpu_parts.py, the transport and store parts of gpu_selfcheck.py and the GPU-only pytest
files of a checkout, gpu_pytest.py, each in a process of its own).  Must not touch: anything but the
tensors, endpoints and processes the checks create.  Layer: with the launcher, CLI and benches (it may
import every layer below; nothing below imports it).
"""
