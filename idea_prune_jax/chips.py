"""Peak FLOP/s per device, the denominator of MFU: bf16 spec for accelerators, f32 measured on CPU."""

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 TFLOP/s per chip from the vendors' spec sheets (no sparsity).
PEAK_BF16_TFLOPS = {'v4': 275, 'v5e': 197, 'v5p': 459, 'v6e': 918, 'h100': 989, 'h200': 989}

# device.device_kind, lowercased -> table key; first match wins (so 'v5 lite' before 'v5').
_KINDS = (('v6 lite', 'v6e'), ('v6e', 'v6e'), ('v5 lite', 'v5e'), ('v5e', 'v5e'),
          ('v5p', 'v5p'), ('tpu v5', 'v5p'), ('v4', 'v4'), ('h200', 'h200'), ('h100', 'h100'))


def chip_name(device) -> str | None:
  """The PEAK_BF16_TFLOPS key of a jax device, or None (CPU, unknown chips)."""
  kind = device.device_kind.lower()
  return next((name for pattern, name in _KINDS if pattern in kind), None)


@functools.cache
def measured_cpu_peak(n: int = 512, repeats: int = 5) -> float:
  """f32 FLOP/s of one square matmul on this process's CPU (best of a few; measured once)."""
  x = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  # Spread over the host's CPU devices: with fake devices each gets a share of the same cores.
  return 2 * n**3 / best / max(len(jax.local_devices(backend='cpu')), 1)


def peak_flops_per_device(device) -> float:
  """Peak FLOP/s of one device: the table for known accelerators, else CPU measured once."""
  name = chip_name(device)
  if name is not None:
    return PEAK_BF16_TFLOPS[name] * 1e12
  if device.platform == 'cpu':
    return measured_cpu_peak()
  return float('nan')  # an unlisted accelerator: MFU unknown rather than a stopped run
