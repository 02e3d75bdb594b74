"""The local executor: a supervised pool of worker processes on this machine (`WorkerPool`, pool.py)."""
