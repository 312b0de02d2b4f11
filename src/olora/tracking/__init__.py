"""MLflow: the client and its one URI rule, lineage tags, run logging, the Trainer callback, the registry, the pyfunc model."""
