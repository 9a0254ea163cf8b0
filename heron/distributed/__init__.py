"""Scale-out: tensor parallelism inside a replica, data-parallel replicas behind one API server.

`parallel_state` is the process's tensor-parallel group and its collectives (the model code reads it
when it builds its layers); `procs` runs objects in worker processes; `tp_worker` is one rank's
worker and `heron.engine.executor.multiproc` the executor that drives the ranks.
"""
