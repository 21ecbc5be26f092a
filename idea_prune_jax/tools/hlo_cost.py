"""FLOPs and bytes of a compiled program with every iteration of its loops counted.

XLA's cost analysis (`compiled.cost_analysis()`) counts a while loop's body once: under `nn.scan`
the layers' FLOPs and bytes are 1/n_layers of the truth, and a chunked loss's loop one chunk's.
Here each loop body of the compiled program's own (optimized, partitioned) HLO is costed as a
module of its own by the same `HloCostAnalysis`, and counted as often as the loop runs:

    cost(C) = xla_cost(C) + sum over loops w in C of trip(w)·cost(body(w)) - xla_cost(body(w))

(and the same for each loop's condition), so nested loops multiply. No further compile: the
analysis reads the text of the executable already compiled.

The same walk counts the bytes each chip moves over the interconnect in collectives (all-gather,
reduce-scatter, all-reduce, all-to-all, collective-permute), with the ring algorithms' per-chip
traffic: a group of n chips all-gathering an output of S bytes receives (n-1)/n·S on each chip,
a reduce-scatter of an S-byte output sends (n-1)·S, an all-reduce of S bytes 2(n-1)/n·S, an
all-to-all (n-1)/n·S, a collective-permute S. The trip count is XLA's
`known_trip_count` where the HLO carries it, else read off the loop condition
(`i < N` on a counter the loop's init sets to a constant), which is how `lax.scan` and
`fori_loop` lower.
"""

import functools
import math
import re

import jax
from jax._src.lib import _jax  # HloCostAnalysis over an HloModule; no public route to it
import jaxlib._hlo as hlo

_HEAD = re.compile(r'^(ENTRY )?%?([\w.\-]+) \(')
_CALLED = re.compile(r'\b(?:calls|to_apply|condition|body|branch_computations|called_computations'
                     r'|true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)')
_WHILE = re.compile(r'^\s*(?:ROOT )?%?[\w.\-]+ = .*? while\(%?([\w.\-]+)\), '
                    r'condition=%?([\w.\-]+), body=%?([\w.\-]+)')
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_STACK_FRAME = re.compile(r',? ?stack_frame_id=\d+')  # ids into a table the text does not carry
# A collective and its output type; the async forms' -done halves move nothing of their own.
_COLLECTIVE = re.compile(r'^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) (all-gather|reduce-scatter|all-reduce'
                         r'|all-to-all|collective-permute)(-start)?\(')
_ARRAY = re.compile(r'\b(pred|[a-z]+\d+)\[([\d,]*)\]')
_DTYPE_BITS = {'pred': 8, 's4': 4, 'u4': 4}
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')


def split(text: str) -> tuple[dict[str, list[str]], str]:
  """HLO module text -> ({computation name: its lines}, entry name)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      head = _HEAD.match(line)
      if head and line.rstrip().endswith('{'):
        current = head.group(2)
        comps[current] = [line]
        entry = current if head.group(1) else entry
    else:
      comps[current].append(line)
      if line == '}':
        current = None
  return comps, entry


def _called(lines: list[str], loops: bool) -> set[str]:
  """Computations these lines call; with loops=False, not into while bodies and conditions."""
  out = set()
  for line in lines[1:]:
    for found in _CALLED.finditer(line):
      if not loops and found.group(0).startswith(('condition=', 'body=')):
        continue
      out.update(re.findall(r'%?([\w.\-]+)', found.group(1)))
  return out


def _closure(comps: dict, root: str, loops: bool) -> list[str]:
  seen, todo = [], [root]
  while todo:
    name = todo.pop()
    if name in comps and name not in seen:
      seen.append(name)
      todo.extend(_called(comps[name], loops))
  return seen


def _xla_cost(comps: dict, root: str) -> dict:
  """XLA's own cost analysis of one computation (its callees included) as a module."""
  parts = ['HloModule cost']
  needed = set(_closure(comps, root, loops=True))
  for name in (n for n in comps if n in needed):  # the text's order: callees before callers
    head, *rest = comps[name]
    head = head.removeprefix('ENTRY ')
    parts.append('\n'.join([('ENTRY ' if name == root else '') + head, *rest]))
  module = hlo.hlo_module_from_text(_STACK_FRAME.sub('', '\n\n'.join(parts)))
  cost = _jax.hlo_module_cost_analysis(jax.devices('cpu')[0].client, module)
  return {'flops': float(cost.get('flops', 0.0)),
          'bytes_accessed': float(cost.get('bytes accessed', 0.0))}


def _defining(lines: list[str], name: str) -> str:
  """The instruction that defines name in these lines ('' if none)."""
  head = re.compile(rf'\s*(?:ROOT )?%?{re.escape(name)} = ')
  return next((line for line in lines if head.match(line)), '')


def _root(lines: list[str]) -> str:
  """The name of a computation's ROOT instruction ('' if none)."""
  for line in lines:
    found = re.match(r'\s*ROOT %?([\w.\-]+)', line)
    if found:
      return found.group(1)
  return ''


def _constant(lines: list[str], name: str | None) -> int | None:
  """The integer constant behind name, through copies (XLA copies a loop's init counter)."""
  for _ in range(8):
    line = _defining(lines, name) if name else ''
    found = re.search(r' constant\((-?\d+)\)', line)
    if found:
      return int(found.group(1))
    copy = re.search(r' (?:copy|bitcast|convert)\(%?([\w.\-]+)\)', line)
    if not copy:
      return None
    name = copy.group(1)
  return None


def _operand(lines: list[str], name: str, index: int) -> str | None:
  """Operand `index` of the tuple instruction name."""
  found = re.search(r' tuple\((.*?)\)(?:, |$)', _defining(lines, name))
  operands = re.findall(r'%?([\w.\-]+)', re.sub(r'/\*.*?\*/', '', found.group(1))) if found else []
  return operands[index] if index < len(operands) else None


def trip_count(comps: dict, caller: str, line: str) -> int | None:
  """How often the while on `line` (in computation caller) runs its body; None if unknown."""
  known = _KNOWN_TRIPS.search(line)
  if known:
    return int(known.group(1))
  init, cond, body = _WHILE.match(line).groups()
  cond_lines, body_lines = comps.get(cond, []), comps.get(body, [])
  compare = re.search(r'compare\(%?([\w.\-]+), %?([\w.\-]+)\), direction=(LT|LE|GT|GE)',
                      _defining(cond_lines, _root(cond_lines)))
  if not compare:
    return None
  lhs, rhs, direction = compare.groups()
  if direction in ('GT', 'GE'):  # N > i is i < N
    lhs, rhs, direction = rhs, lhs, {'GT': 'LT', 'GE': 'LE'}[direction]
  counter = re.search(r'get-tuple-element\(.*?\), index=(\d+)', _defining(cond_lines, lhs))
  if not counter:
    return None
  index = int(counter.group(1))
  # The body must add a constant step to the same tuple element.
  add = re.search(r' add\(%?([\w.\-]+), %?([\w.\-]+)\)',
                  _defining(body_lines, _operand(body_lines, _root(body_lines), index) or ''))
  steps = [_constant(body_lines, n) for n in add.groups()] if add else []
  step = next((s for s in steps if s is not None), None)
  bound = _constant(cond_lines, rhs)
  start = _constant(comps[caller], _operand(comps[caller], init, index))
  if None in (bound, start, step) or step <= 0:
    return None
  return max(0, -(-(bound - start + (direction == 'LE')) // step))


def _array_bytes(type_text: str) -> list[int]:
  """Bytes of each array in an HLO type ('bf16[8,16]{1,0}' or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(type_text):
    bits = _DTYPE_BITS.get(dtype) or int(re.match(r'[a-z]+(\d+)', dtype).group(1))
    out.append(math.prod(int(d) for d in dims.split(',') if d) * bits // 8)
  return out


def _group_size(line: str, partitions: int) -> int:
  """Chips in each replica group of a collective: {{0,1},{2,3}}, [groups,size]<=[N], or
  mesh['a'=2,'b'=4] {'b'} (the named mesh axes); no groups means every partition."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)? \{([^}]*)\}", line)
  if mesh:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
    axes = re.findall(r"'([^']+)'", mesh.group(2)) or list(sizes)
    return math.prod(int(sizes[a]) for a in axes)
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line)
  if iota:
    return int(iota.group(2))
  listed = re.search(r'replica_groups=\{\{([^}]*)\}', line)
  if listed:
    return len(listed.group(1).split(','))
  return partitions


def collective_bytes(line: str, partitions: int) -> tuple[str, float] | None:
  """(kind, bytes one chip sends or receives) of a collective instruction, else None."""
  found = _COLLECTIVE.match(line)
  if not found:
    return None
  type_text, kind, start = found.groups()
  sizes = _array_bytes(type_text)
  if start and kind == 'all-gather':  # (operands..., outputs...)
    sizes = sizes[len(sizes) // 2:]
  elif start and kind == 'collective-permute':  # (operand, output, contexts)
    sizes = sizes[1:2]
  size = float(sum(sizes))
  if kind == 'collective-permute':
    return kind, size
  n = _group_size(line, partitions)
  factor = {'all-gather': (n - 1) / n, 'reduce-scatter': n - 1, 'all-reduce': 2 * (n - 1) / n,
            'all-to-all': (n - 1) / n}[kind]
  return kind, factor * size


def loop_cost(text: str) -> dict:
  """Cost of an HLO module with all loop iterations counted, and its loops' trip counts.

  Returns {'flops', 'bytes_accessed'} counted in full, the same as XLA counts them ('once':
  each loop body once), 'collectives': {kind: bytes per chip} counted in full, and 'loops':
  [(body, trips), ...]; a loop whose trip count cannot be read keeps its body counted once and
  has trips None.
  """
  comps, entry = split(text)
  partitions = re.search(r'num_partitions=(\d+)', text.split('\n', 1)[0])
  partitions = int(partitions.group(1)) if partitions else 1
  loops = []
  xla_cost = functools.cache(lambda name: _xla_cost(comps, name))

  @functools.cache
  def moved(name: str) -> dict[str, float]:
    """Collective bytes per chip of one computation, its loops' iterations counted."""
    out = dict.fromkeys(COLLECTIVES, 0.0)
    for caller in _closure(comps, name, loops=False):
      for line in comps[caller][1:]:
        found = collective_bytes(line, partitions)
        if found:
          out[found[0]] += found[1]
        loop = _WHILE.match(line)
        if loop:
          trips = trip_count(comps, caller, line)
          for part in loop.groups()[1:]:
            for kind, nbytes in moved(part).items():
              out[kind] += (1 if trips is None else trips) * nbytes
    return out

  @functools.cache
  def cost(name: str) -> tuple[float, float]:
    own = xla_cost(name)
    flops, nbytes = own['flops'], own['bytes_accessed']
    for caller in _closure(comps, name, loops=False):
      for line in comps[caller][1:]:
        found = _WHILE.match(line)
        if not found:
          continue
        _, cond, body = found.groups()
        trips = trip_count(comps, caller, line)
        loops.append((body, trips))
        if trips is None:
          continue
        for part in (body, cond):
          once, all_ = xla_cost(part), cost(part)
          flops += trips * all_[0] - once['flops']
          nbytes += trips * all_[1] - once['bytes_accessed']
    return flops, nbytes

  flops, nbytes = cost(entry)
  return {'flops': flops, 'bytes_accessed': nbytes, 'once': xla_cost(entry), 'loops': loops,
          'collectives': moved(entry)}
