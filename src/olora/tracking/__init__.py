"""MLflow: the client and its one URI rule, names, lineage tags, run logging, the Trainer callback, the registry, the
promotion gate, the model card and rescoring. The registered pyfunc model itself is `olora.serving.pyfunc`."""
