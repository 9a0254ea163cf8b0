"""Scale-out: tensor parallelism inside a replica, data-parallel replicas behind one API server.

- `parallel_state`: this process's tensor-parallel group, its collectives, and how a model splits
  over it (the model code reads it when it builds its layers and cuts its weights).
- `procs`: objects living in worker processes, called in order, whose death is never a hang.
- `tp_worker`: one tensor-parallel rank; `heron.engine.executor.multiproc` drives the ranks.
- `replica`, `dp_engine`, `router`: data-parallel replicas, their proxy cores and the one engine
  the server sees, and which replica a request goes to.
- `ray_backend`: the same ranks and replicas as Ray actors (--distributed-executor-backend ray).

The design, what is shared and how to size it: docs/scale-out.md.
"""
