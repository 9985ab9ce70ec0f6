"""sessiontag: tag, store, search and compare LLM chat traces by session, in PostgreSQL."""

from .client import Client
from .errors import DatabaseError, SessiontagError
from .types import Conversation, Model, SessionTag

__version__ = "0.1.0"

__all__ = ["Client", "Conversation", "DatabaseError", "Model", "SessionTag", "SessiontagError", "__version__"]
