"""mqfast: a fast HTTP gateway for messages."""

__version__ = "0.1.0"
