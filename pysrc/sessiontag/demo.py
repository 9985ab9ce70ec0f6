"""`sessiontag demo`: a small realistic workload through the SQL API."""

from __future__ import annotations

import random
import uuid

from .client import Client

MODELS = [("GPT-4o", "openai", "gpt-4o"), ("Claude 3.5 Sonnet", "anthropic", "claude-3-5-sonnet"),
          ("Llama 3.1 70B", "meta", "llama-3.1-70b")]
USERS = 4
CONVERSATIONS_PER_USER = 6
TITLES = ["Refactor a SQL query", "Plan a trip to Lisbon", "Explain keyset pagination", "Draft a cover letter",
          "Debug a flaky test", "Summarize a paper", "Name a new product", "Write a haiku about Postgres"]


def run(client: Client, seed: int | None = None) -> list[dict]:
    """Register the models and create tagged conversations; returns what was created."""
    rng = random.Random(seed)
    model_ids = [client.register_model(name, provider, key) for name, provider, key in MODELS]
    created = []
    for u in range(USERS):
        user_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        for _ in range(CONVERSATIONS_PER_USER):
            model_id = rng.choice(model_ids)
            if rng.random() < 0.7:  # tagged at creation
                conv = client.create_conversation(user_id, model_id, title=rng.choice(TITLES))
            else:  # tagged at the first message
                conv = client.create_conversation(user_id, title=rng.choice(TITLES))
                client.ensure_session_tag(conv.id, model_id)
            tag = client.ensure_session_tag(conv.id)
            created.append({"user": f"user {u + 1}", "badge": client.session_badge(tag, user_id),
                            "session_id": tag, "title": conv.title, "conversation_id": conv.id})
    return created
