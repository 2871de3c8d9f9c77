"""Peak throughput of accelerators, for MFU (model FLOPs utilisation) in logs and benchmarks."""

from __future__ import annotations

import jax

# Dense (no sparsity) bf16 peak TFLOP/s per device, from vendor datasheets. Matched as
# substrings of `device.device_kind` in this order, so specific names come first.
PEAK_TFLOPS_BF16 = {
  "GH200": 989.0,
  "H200": 989.0,
  "H100 PCIe": 756.0,
  "H100": 989.0,  # SXM.
  "B200": 2250.0,
  "A100": 312.0,
  "A10G": 70.0,
  "L40S": 362.0,
  "L4": 121.0,
  "V100": 125.0,  # fp16 tensor cores (no bf16).
  "TPU v4": 275.0,
  "TPU v5 lite": 197.0,
  "TPU v5e": 197.0,
  "TPU v5p": 459.0,
  "TPU v5": 459.0,  # v5p reports its kind as "TPU v5".
  "TPU v6 lite": 918.0,
  "TPU v6e": 918.0,
}


def peak_tflops(device: jax.Device | None = None) -> float | None:
  """bf16 peak of `device` (default: the first device), or None if unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_TFLOPS_BF16.items():
    if name.lower() in kind.lower():
      return peak
  return None


def memory_in_use(device: jax.Device | None = None) -> dict[str, int]:
  """Bytes in use / peak bytes on `device`; empty where the backend has no stats (CPU)."""
  stats = (device or jax.local_devices()[0]).memory_stats() or {}
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}
