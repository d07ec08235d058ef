"""The library call and its stages: anonymize.py (anonymize(): files, folders, pipes), pipeline.py
(the per-file pipeline), report.py (results and progress), routing.py (which faces get which
pass), jobs.py (folders, locks, shards, atomic files)."""
