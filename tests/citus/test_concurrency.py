"""Gapless, unique session numbers on Citus under many real connections, with rollbacks
and transactions spanning users on different workers (retried on distributed deadlock)."""

from __future__ import annotations

import random
import threading
import uuid
from collections import defaultdict

import psycopg

from tests.citus.conftest import retrying

WRITERS = 12
ROUNDS = 30


def test_counters_stay_gapless_and_unique_under_concurrency(distributed):
    with psycopg.connect(distributed, autocommit=True) as conn:
        models = [conn.execute("SELECT sessiontag.register_model(%s, 'p', %s)", [f"M{i}", f"conc-{i}"]).fetchone()[0]
                  for i in range(2)]
    users = [uuid.uuid4() for _ in range(6)]
    committed = defaultdict(list)
    lock = threading.Lock()
    retries = [0]
    errors = []

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            with psycopg.connect(distributed) as conn:
                for _ in range(ROUNDS):
                    # two users per transaction (often on two workers), one or two conversations each
                    picked = rnd.sample(users, 2)
                    model = rnd.choice(models)
                    rollback = rnd.random() < 0.2

                    def work(c):
                        made = []
                        for user in sorted(picked):  # one order: no deadlock among ourselves on a node
                            for _ in range(rnd.randint(1, 2)):
                                made.append((user, c.execute(
                                    "SELECT session_counter FROM sessiontag.create_conversation(%s, %s)",
                                    [user, model]).fetchone()[0]))
                        if rollback:
                            raise _Rollback
                        return made

                    attempts = 0
                    while True:
                        try:
                            made = retrying(conn, work)
                            with lock:
                                for user, number in made:
                                    committed[(user, model)].append(number)
                            break
                        except _Rollback:
                            break
                        except psycopg.errors.DeadlockDetected:
                            attempts += 1
                    with lock:
                        retries[0] += attempts
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(distributed, autocommit=True) as conn:
        for (user, model), numbers in committed.items():
            stored = [r[0] for r in conn.execute(
                "SELECT session_counter FROM sessiontag.conversations WHERE user_id = %s AND llm_model_id = %s"
                " ORDER BY session_counter", [user, model])]
            assert stored == sorted(numbers) == list(range(1, len(numbers) + 1)), (user, model)
    assert sum(len(v) for v in committed.values()) > WRITERS * ROUNDS // 2


class _Rollback(Exception):
    pass
