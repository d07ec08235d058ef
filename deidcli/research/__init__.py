"""The research side of deid: train/ (prepare, train, export), evaluate.py (LFW), evaluate_video.py
and video_report.py (videos), measures.py (shared by both), judges.py, garish.py, bench.py, and the
stress sets (stress.py, stress_eval.py, sheets.py). It may import the product (``deidcli``); the
product never imports it: the CLI loads these commands by name on first use (cli/lazy.py)."""
