"""IDEA Prune in JAX: enlarge, prune FFN neurons gradually inside one cosine, shrink, recover."""
