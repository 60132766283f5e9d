"""Everything MLflow: runs, per-epoch logging, artifacts, registry."""

import study  # noqa: F401  (chooses the Keras backend before anything imports keras)
