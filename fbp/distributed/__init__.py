"""Scale-out: data parallelism over a device mesh (``parallel``), how the train state
is laid out on it (``layout``) and joining several processes (``cluster``)."""
