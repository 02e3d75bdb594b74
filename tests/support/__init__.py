"""What the tests share that is not a test: harnesses (a pool to drive, a Dask cluster and a Redis
server started as real processes) and the task modules the tests register (faults, shared memory,
Dask, the container smoke's user module, the execution transports). Tests import them from here;
a server under test loads the task modules by name (`--tasks tests.support.fault_tasks`)."""
