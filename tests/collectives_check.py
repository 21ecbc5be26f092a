"""Run by test_hlo_cost on 8 fake CPU devices: the collective bytes hlo_cost counts in a program
whose collectives are known by construction. Prints one JSON line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from idea_prune_jax.tools import hlo_cost

LAYERS = 5


def main():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('a', 'b'))

  def body(ws, x):
    def layer(x, w):  # each of 4 chips holds a [16, 64] f32 quarter of the layer's [64, 64]
      full = jax.lax.all_gather(w, 'b', axis=0, tiled=True)
      return jnp.tanh(x @ full), None
    y = jax.lax.scan(layer, x, ws)[0]
    return jax.lax.psum(y, 'a')  # [8, 64] f32 over the 2 chips of each 'a' group

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(None, 'b', None), P()),
                             out_specs=P(), check_vma=False))
  text = fn.lower(jnp.ones((LAYERS, 64, 64)), jnp.ones((8, 64))).compile().as_text()
  cost = hlo_cost.loop_cost(text)
  print(json.dumps({'collectives': cost['collectives'], 'loops': cost['loops'],
                    'layers': LAYERS}))


if __name__ == '__main__':
  main()
