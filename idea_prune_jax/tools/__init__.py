"""compile-check (TPU compiler via libtpu), HLO cost, report."""
