"""GKP-Bench: grouped kernel pruning and the pruning granularities it is compared with."""

__version__ = "0.1.0"
