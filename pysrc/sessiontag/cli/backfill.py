"""`sessiontag backfill`: numbers the conversations that predate session tagging, one
batch (one transaction) at a time, until none is left."""

from __future__ import annotations

import signal
import signal
import time

import click

from .. import migrate
from ..errors import DatabaseError
from .app import USER_ID, Interrupted, State, cli, pass_state, progress, progress_option, resolve_model

# A batch that meets the application's own transactions on the same keys may be chosen
# as the victim of a deadlock or a serialization conflict; it changed nothing, so it is
# simply run again.
RETRYABLE = {"40001", "40P01"}
RETRIES = 5


@cli.command("backfill", short_help="Tag the conversations that have no session tag yet.")
@click.option("--user", "user_id", type=USER_ID, help="Only this user's conversations.")
@click.option("--model", help="Only conversations of this model (name, key or id).")
@click.option("--batch-size", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True,
              help="Conversations per batch; each batch is one transaction.")
@progress_option
@pass_state
def backfill_cmd(state: State, user_id, model, batch_size: int, show_progress: bool | None) -> None:
    """Number the untagged conversations of tracked models (conversations from before
    sessiontag, or from while their model was not tracked), continuing each user's and
    model's session numbers in creation order. Commits after each batch: stopping (Ctrl-C)
    keeps the batches done, and running it again finishes the job. Safe while the
    application keeps creating conversations."""
    migrate.require(state.dsn, "0010_bulk_numbering", "the backfill")
    numbered = 0
    with state.client() as client:
        model_id = resolve_model(client, model).id if model else None
        total = client.count_untagged_conversations(user_id, model_id)
        try:
            with progress(total, "tagging", "conversations", show_progress) as advance:
                while True:
                    with _HeldCtrlC() as held:
                        done = _batch(client, user_id, model_id, batch_size, held)
                        numbered += done
                        advance(done)
                    if done == 0:
                        break
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {numbered} conversations were tagged and stay tagged; run the same"
                              " command again to tag the rest") from None
    click.echo(f"tagged {numbered} conversation{'s' if numbered != 1 else ''}"
               + ("" if numbered else ": none was left untagged"))


class _HeldCtrlC:
    """Ctrl-C while a batch runs cancels it, and nothing of it stays. Once the batch has
    run, Ctrl-C is held back until it is committed and counted, then let through: the
    count the interrupted backfill reports is what stays tagged. (With SIGINT ignored, as
    in a background job, it stays ignored.)"""

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGINT)
        self._pending = False
        return self

    def hold(self) -> None:
        if self._previous is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self._note)

    def release(self) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _note(self, signum, frame) -> None:
        self._pending = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.release()
        if self._pending and exc_type is None:
            raise KeyboardInterrupt
        return False


def _batch(client, user_id, model_id, batch_size: int, held: _HeldCtrlC) -> int:
    """One batch in a transaction of its own, run again after a deadlock or serialization
    failure."""
    attempt = 0
    while True:
        held.release()
        try:
            with client.conn.transaction():
                done = client.tag_untagged_conversations(user_id, model_id, batch_size)
                held.hold()  # from here to the count, Ctrl-C waits
            return done
        except DatabaseError as exc:
            attempt += 1
            if exc.sqlstate not in RETRYABLE or attempt == RETRIES:
                raise
            time.sleep(0.05 * 2 ** attempt)
