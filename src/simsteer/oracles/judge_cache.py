"""An on-disk cache of judge answers, so a rerun or ``--resume`` never pays twice.

The key is a hash of everything that changes the answer: the request parameters (model,
endpoint, mode, max_tokens, temperature), the template's content hash, the prompt and the
responses in the order shown; editing a template or asking for longer answers asks again.
Only answers that parse are stored (the judge checks them again on every read, so an old
or hand-made entry that no longer parses is asked anew): an unparseable answer is never
replayed on every resume. The raw answer text is stored and parsed on every read, so a
better parser needs no new requests.

SQLite in WAL mode makes each insert atomic, lets several runs share one file and keeps
readers from blocking the writer; the default file is in the simsteer cache folder
(``$SIMSTEER_CACHE``), shared by all runs. A file that is not a readable SQLite database
gives one :class:`~simsteer.errors.SimsError` line naming it, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from ..errors import SimsError


def cache_key(request: dict[str, Any], prompt: str, responses: list[str]) -> str:
    """The cache key of one judge request.

    Args:
        request: every setting that changes the answer (model, endpoint, mode, template
            hash, max_tokens, temperature, ...); JSON-serialisable.
        prompt: the user request being judged.
        responses: the answers in the order they are shown.
    """
    blob = json.dumps([request, prompt, responses], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class JudgmentCache:
    """``key -> answer text`` in a SQLite file (created on first use).

    Args:
        path: the SQLite file; its folder is created when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _fail(self, exc: sqlite3.Error) -> SimsError:
        """One line naming the file and what to do, for any SQLite failure."""
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, sqlite3.OperationalError):  # locked, read-only, missing folder, ...
            return SimsError(
                f"judge cache {self.path} cannot be used ({detail}): "
                "check its permissions, or pick another file with --judge-cache"
            )
        return SimsError(
            f"judge cache {self.path} is corrupt ({detail}): delete it (and any -wal / -shm "
            "file beside it) or pick another file with --judge-cache"
        )

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SimsError(
                    f"judge cache {self.path}: cannot create its folder ({exc.strerror})"
                ) from None
            db = None
            try:
                db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
                # WAL: atomic commits that survive a kill, and readers that do not block a writer
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT)")
                db.commit()
            except sqlite3.Error as exc:
                if db is not None:
                    db.close()
                raise self._fail(exc) from None
            self._db = db
        return self._db

    def open(self) -> JudgmentCache:
        """Open (or create) the file now, so a bad one is reported before any work."""
        with self._lock:
            self._conn()
        return self

    def get(self, key: str) -> str | None:
        """The stored answer for ``key``, or ``None``."""
        with self._lock:
            try:
                row = self._conn().execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as exc:
                raise self._fail(exc) from None
        return None if row is None else row[0]

    def put(self, key: str, answer: str) -> None:
        """Store ``answer`` under ``key`` (committed before returning)."""
        with self._lock:
            try:
                db = self._conn()
                db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, answer))
                db.commit()
            except sqlite3.Error as exc:
                raise self._fail(exc) from None

    def __len__(self) -> int:
        with self._lock:
            try:
                return int(self._conn().execute("SELECT COUNT(*) FROM answers").fetchone()[0])
            except sqlite3.Error as exc:
                raise self._fail(exc) from None

    def close(self) -> None:
        """Close the connection (the last one to close folds the WAL back into the file)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
