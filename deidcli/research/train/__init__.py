"""Training: LFW preparation (prepare.py), losses (losses.py), the loop (loop.py) and the
Click commands (commands.py). ``python -m deidcli.research.train`` runs the training loop."""
