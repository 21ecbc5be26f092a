"""Shared by benchmarks/*.py: timing, the machine's measured matmul peak, machine facts, and
appending a section to BENCHMARKS.md.

The machine is shared and noisy, so a figure is only meaningful as a ratio against something
measured in the same run; scripts interleave their measurements with `PeakMeter.sample()`.
"""

import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(REPO, 'BENCHMARKS.md')

HEADER = """\
# Benchmarks

Figures written by the scripts in `benchmarks/`, newest section last. The machine is shared and
noisy (other jobs compete for its cores), so absolute times move from run to run by large factors;
what carries meaning is a ratio within one run — step time against the machine's own matmul peak
measured in the same run, interleaved with the steps (peak, step, peak, step, ..., peak), or one
step against another. Each section names the date, the machine and the exact command that
produced it; rerun that command to reproduce it rather than comparing across sections.
"""


def median(xs):
  return statistics.median(xs)


def timed(fn, *args):
  """(wall seconds, process CPU seconds, output) of one call, including waiting for the result.

  CPU seconds (all threads) move far less than wall seconds when other jobs take the cores (wall
  can double); they do miss time a core sits idle waiting, so report both.
  """
  wall, cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - wall, time.process_time() - cpu, out


class PeakMeter:
  """f32 GEMM throughput over a few shapes; a sample's peak is the best shape's median.

  Throughput is kept both per wall second and per CPU second (see `timed`).

  Shapes are (m, k, n) for [m, k] @ [k, n]: pass the model's own matmul shapes plus a square one
  or two, since XLA's CPU GEMM speed depends on the shape and "peak" should be achievable.
  """

  def __init__(self, shapes, repeats: int = 3, dtype=jnp.float32):
    self.shapes = sorted(set(tuple(s) for s in shapes))
    self.repeats = repeats
    matmul = jax.jit(lambda a, b: a @ b)
    self._calls = {}
    for i, (m, k, n) in enumerate(self.shapes):
      ka, kb = jax.random.split(jax.random.key(i))
      a = jax.random.normal(ka, (m, k), dtype)
      b = jax.random.normal(kb, (k, n), dtype)
      compiled = matmul.lower(a, b).compile()
      jax.block_until_ready(compiled(a, b))  # first-touch of the output buffer pool
      self._calls[(m, k, n)] = (compiled, a, b)
    self.samples = []  # one {shape: FLOP/s per wall second} per sample()
    self.cpu_samples = []  # the same per CPU second

  def sample(self) -> float:
    """Measures every shape now; returns this sample's peak FLOP/s (wall)."""
    wall, cpu = {}, {}
    for shape, (compiled, a, b) in self._calls.items():
      flops = 2 * shape[0] * shape[1] * shape[2]
      times = [timed(compiled, a, b)[:2] for _ in range(self.repeats)]
      wall[shape] = flops / median([t[0] for t in times])
      cpu[shape] = flops / median([t[1] for t in times])
    self.samples.append(wall)
    self.cpu_samples.append(cpu)
    return max(wall.values())

  def by_shape(self, cpu: bool = False) -> dict:
    """Median FLOP/s over all samples, per shape (per CPU second if cpu)."""
    samples = self.cpu_samples if cpu else self.samples
    return {s: median([x[s] for x in samples]) for s in self.shapes}

  def peak(self, cpu: bool = False) -> float:
    """The run's peak: the best shape's median over all samples."""
    return max(self.by_shape(cpu).values())


def machine() -> dict:
  """CPU model and cores, jax version and backend, load average (the run's noise context)."""
  model = platform.processor() or platform.machine()
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    for line in lscpu.splitlines():
      if line.startswith('Model name:'):
        model = line.split(':', 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  device = jax.devices()[0]
  return {
      'cpu': model,
      'cores': os.cpu_count(),
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'devices': f'{jax.device_count()} x {device.device_kind}',
      'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
      'load average (1 min)': f'{os.getloadavg()[0]:.2f}',
  }


def command() -> str:
  """The command line that ran this script, relative to the repo root where possible."""
  exe = sys.executable
  if exe.startswith(REPO + os.sep):
    exe = os.path.relpath(exe, REPO)
  script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
  flags = os.environ.get('XLA_FLAGS')
  env = f'XLA_FLAGS={shlex.quote(flags)} ' if flags else ''
  return env + shlex.join([exe, script, *sys.argv[1:]])


def table(headers, rows) -> str:
  """A Markdown table; cells are str()-ed."""
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def append_section(title: str, body: str, facts: dict | None = None, path: str = BENCHMARKS_MD):
  """Appends '## title' with date, command and machine facts, then body; writes the header first
  if the file is new."""
  facts = machine() if facts is None else facts
  date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  machine_line = ', '.join(f'{k}: {v}' for k, v in facts.items() if v != '')
  section = (f'\n## {title}\n\n'
             f'- date: {date}\n'
             f'- command: `{command()}`\n'
             f'- machine: {machine_line}\n\n'
             f'{body.rstrip()}\n')
  new = not os.path.exists(path) or os.path.getsize(path) == 0
  with open(path, 'a') as f:
    if new:
      f.write(HEADER)
    f.write(section)
  print(f'\nappended to {path}')
