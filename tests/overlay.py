"""Re-exported for the tests: the shared tiny overlay lives in the library (`olora.overlay`), used by the benchmarks too."""

from olora.overlay import REPO, copy_project, install_model, tiny_overrides, write_params  # noqa: F401
