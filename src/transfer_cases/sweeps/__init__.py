"""Searches beyond one process: a resumable, shareable Optuna study (sweeper.py, study.py), pruning
from inside the jobs (pruning.py), and one torch thread per parallel job (threads.py)."""

import os

# Optuna 2's storage models use SQLAlchemy 1.4 APIs that 2.0 removed (hence the pin of the optuna
# extra); 1.4 says so in a warning on every import, which tells a user nothing they can act on.
os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
