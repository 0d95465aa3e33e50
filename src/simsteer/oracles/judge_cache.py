"""An on-disk cache of judge answers, so a rerun or ``--resume`` never pays twice.

The key is a hash of (judge, template, prompt, responses in the order shown): the judge
is ``MODEL@BASE_URL`` and the template is its content hash, so editing a template asks
again while a reworded run directory does not. The raw answer text is stored and parsed
on every read, so a better parser needs no new requests. SQLite makes each insert atomic
and safe from several threads; the default file is in the simsteer cache folder
(``$SIMSTEER_CACHE``), shared by all runs.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path


def cache_key(judge: str, template: str, prompt: str, responses: list[str]) -> str:
    blob = json.dumps([judge, template, prompt, responses], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class JudgmentCache:
    """``key -> answer text`` in a SQLite file (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT)")
            self._db.commit()
        return self._db

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn().execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, answer: str) -> None:
        with self._lock:
            db = self._conn()
            db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, answer))
            db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn().execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
