"""Searches beyond one process: a resumable, shareable Optuna study (sweeper.py, study.py), pruning
from inside the jobs (pruning.py), and one torch thread per parallel job (threads.py)."""
