"""sessiontag: tag, store, search and compare LLM chat traces by session, in PostgreSQL."""

from .client import Client
from .errors import DatabaseError, SessiontagError
from .recorder import Recorder
from .types import Conversation, Model, ModelComparison, SessionSummary, SessionTag, Span, TraceRow, TraceSpan

__version__ = "0.1.0"

__all__ = ["Client", "Conversation", "DatabaseError", "Model", "ModelComparison", "Recorder", "SessionSummary",
           "SessionTag", "SessiontagError", "Span", "TraceRow", "TraceSpan", "__version__"]
