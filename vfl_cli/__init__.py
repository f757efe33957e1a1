"""vfl: vertical federated learning by split learning."""

__version__ = "0.1.0"
