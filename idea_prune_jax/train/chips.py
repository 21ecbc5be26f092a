"""Accelerator chips: HBM, bf16 peak, HBM and interconnect bandwidth per chip (one JAX device),
and TPU slices.

Figures are the vendors' published per-chip numbers (Cloud TPU system-architecture pages; NVIDIA
H100/H200 SXM datasheets, dense bf16 without sparsity). They serve compile-check's roofline and
the trainer's MFU; a measured peak is always lower. The interconnect figure is the published
bidirectional ICI (NVLink) bandwidth per chip over all its ports; v4's page gives none, so its
is the pod's all-reduce bandwidth per chip (1.1 PB/s over 4096 chips) times two, the relation
the v5e and v6e pages' own figures obey.
"""

import dataclasses
import functools
import math
import re
import time


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_gib: float  # per chip
  bf16_tflops: float  # dense peak per chip
  hbm_gbps: float  # GB/s (1e9 bytes) per chip
  ici_gbps: float  # GB/s per chip, both directions of all its ICI ports (NVLink on GPUs)
  ici_ports: int

  @property
  def collective_gbps(self) -> float:
    """What one chip can send (or receive) at once: every port, one direction. A ring
    collective over the whole slice keeps every port busy; one along a single torus axis uses
    two ports, so this is the collectives' best case."""
    return self.ici_gbps / 2


CHIPS = {
    'v4': Chip('TPU v4', 32.0, 275.0, 1228.0, 537.0, 6),
    'v5e': Chip('TPU v5e', 16.0, 197.0, 819.0, 400.0, 4),
    'v5p': Chip('TPU v5p', 95.0, 459.0, 2765.0, 1200.0, 6),
    'v6e': Chip('TPU v6e', 32.0, 918.0, 1640.0, 800.0, 4),
    'h100': Chip('NVIDIA H100 SXM', 80.0, 989.0, 3350.0, 900.0, 18),
    'h200': Chip('NVIDIA H200 SXM', 141.0, 989.0, 4800.0, 900.0, 18),
}

# JAX `device_kind` strings -> CHIPS keys (for a running job's MFU).
_DEVICE_KINDS = {'tpu v4': 'v4', 'tpu v5 lite': 'v5e', 'tpu v5e': 'v5e', 'tpu v5': 'v5p',
                 'tpu v5p': 'v5p', 'tpu v6 lite': 'v6e', 'tpu v6e': 'v6e', 'nvidia h100': 'h100',
                 'nvidia h200': 'h200'}


# Dense bf16 TFLOP/s per chip (the MFU denominator in the trainer's logs).
PEAK_BF16_TFLOPS = {key: chip.bf16_tflops for key, chip in CHIPS.items()}


def _kind_key(kind: str) -> str | None:
  kind = kind.lower()
  # Longest prefix first: 'tpu v5 lite' (v5e) before 'tpu v5' (v5p).
  for prefix in sorted(_DEVICE_KINDS, key=len, reverse=True):
    if kind.startswith(prefix):
      return _DEVICE_KINDS[prefix]
  return None


def from_device_kind(kind: str) -> Chip | None:
  """The chip of a `jax.Device.device_kind` ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), or None."""
  key = _kind_key(kind)
  return None if key is None else CHIPS[key]


def chip_name(device) -> str | None:
  """The CHIPS key of a jax device, or None (CPU, unknown chips)."""
  return _kind_key(device.device_kind)


@functools.cache
def measured_cpu_peak(n: int = 512, repeats: int = 5) -> float:
  """f32 FLOP/s of one square matmul on this process's CPU (best of a few; measured once)."""
  import jax
  import jax.numpy as jnp
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


# Cloud TPU slice names: the number after v4- and v5p- counts TensorCores (two per chip, one JAX
# device per chip), after v5e- / v5litepod- and v6e- it counts chips.
_CORES_PER_CHIP = {'v4': 2, 'v5p': 2, 'v5e': 1, 'v6e': 1}
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6litepod': 'v6e'}
# How chips are spread over hosts (4 chips per host), for the topology description.
_HOST_BOUNDS = (2, 2, 1)


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A Cloud TPU slice (`parse_slice`); not `structure.Slice`, a param slice of a prunable unit."""
  generation: str  # a CHIPS key: v4 | v5e | v5p | v6e
  chips: int
  topology: str  # libtpu topology name, e.g. 'v5p:2x4x4'

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]


def _grid(chips: int, ndim: int) -> tuple[int, ...]:
  """Chip grid of a slice: 2x2(x1), doubled along its last smallest axis (v5p-64: 2x4x4)."""
  dims = [1] * ndim if chips == 1 else ([2, 2] + [1] * (ndim - 2))
  while math.prod(dims) < chips:
    i = min(range(ndim), key=lambda a: (dims[a], -a))
    dims[i] *= 2
  return tuple(dims)


def parse_slice(name: str) -> TpuSlice:
  """'v5p-64' (32 chips), 'v5e-64' / 'v5litepod-64' (64 chips), 'v6e-8', 'v4-32', or a libtpu
  topology 'v5p:2x4x4'."""
  name = name.strip().lower()
  m = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)+)', name)
  if m:
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in _CORES_PER_CHIP:
      raise ValueError(f'--topology={name!r}: unknown TPU generation {m.group(1)!r}; '
                       f'use one of {", ".join(_CORES_PER_CHIP)}')
    chips = math.prod(int(d) for d in m.group(2).split('x'))
    return TpuSlice(gen, chips, f'{gen}:{m.group(2)}')
  m = re.fullmatch(r'([a-z0-9]+)-(\d+)', name)
  gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
  if gen not in _CORES_PER_CHIP:
    raise ValueError(f'--topology={name!r}: use v5p-N, v4-N (N TensorCores, 2 per chip), '
                     'v5e-N or v6e-N (N chips), or a libtpu name such as v5p:2x4x4')
  n, per_chip = int(m.group(2)), _CORES_PER_CHIP[gen]
  chips = n // per_chip
  if n % per_chip or chips < 1 or chips & (chips - 1):
    raise ValueError(f'--topology={name!r}: {gen}-N needs N = {per_chip} x a power of two '
                     f'({"TensorCores" if per_chip == 2 else "chips"}), e.g. {gen}-{per_chip * 8}')
  ndim = 3 if gen in ('v4', 'v5p') else 2
  grid = _grid(chips, ndim)
  return TpuSlice(gen, chips, f'{gen}:{"x".join(map(str, grid))}')


def topology_devices(sl: TpuSlice):
  """The slice's TPU devices on this (CPU-only) machine, from libtpu's topology description.

  Needs libtpu (the `tpu` extra); raises ImportError without it.
  """
  from jax.experimental import topologies
  dims = sl.topology.split(':')[1].split('x')
  bounds = tuple(min(b, int(d)) for b, d in zip(_HOST_BOUNDS, dims + ['1'] * 3))
  # v4's default chip config exposes each TensorCore as a device; 'megacore' is what JAX on a
  # v4 VM uses (one device per chip), like v5p.
  config = 'megacore' if sl.generation == 'v4' else 'default'
  topo = topologies.get_topology_desc(platform='tpu', topology_name=sl.topology,
                                      chip_config_name=config, chips_per_host_bounds=bounds,
                                      num_slices=1)
  return list(topo.devices)
