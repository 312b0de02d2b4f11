"""Serving: the registered MLflow pyfunc model (generation with the trained adapter) and the HTTP server that follows an alias."""
