"""What every stage shares: the run directory's layout, storage I/O and input errors.

`partitioner/` and `worker/` may import this package; it imports neither of them.
"""
