"""cmcr: connect pretrained multi-modal contrastive representations (C-MCR, NeurIPS 2023).

The import name ``cmcr`` is the front door (CLI, version, error types). The three rooms are
``cmcr.pipeline`` (corpora → shards → encoders → stores), ``cmcr.stores`` (store format, indexes,
memories and semantic completion) and ``cmcr.trainer`` (projectors, losses, training, evaluation).
"""

from cmcr.errors import CmcrError

__version__ = "0.1.0"
__all__ = ["CmcrError", "__version__"]
