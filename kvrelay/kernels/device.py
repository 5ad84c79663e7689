"""What the kernels are measured against on a GPU: the device's peak DRAM bandwidth.

Owns: `device_peak_gbps()` and the datasheet figures it falls back on.  The GPU check
(gpu_check.py) and the benchmark suite (kvrelay/bench/kernels.py) both report against it.
Must not touch: the kernels, or the benchmark package (kernels never import bench).
"""

from __future__ import annotations

import torch

# Peak DRAM bandwidth (GB/s) of common parts, for when the driver does not report it.
KNOWN_PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                   "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0,
                   "A10": 600.0}


def device_peak_gbps(device: int = 0) -> tuple[float, str]:
    """The device's peak DRAM bandwidth and where the figure came from."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "driver (memory clock x bus width)"
    for key, value in KNOWN_PEAK_GBPS.items():
        if key in props.name:
            return value, f"datasheet ({key})"
    raise RuntimeError(f"unknown peak bandwidth for {props.name}; add it to KNOWN_PEAK_GBPS "
                       f"(kvrelay/kernels/device.py)")
