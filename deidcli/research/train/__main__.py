"""``python -m deidcli.research.train [OPTIONS]``: the training command without the main CLI."""

from .commands import train_command

if __name__ == "__main__":
    train_command(prog_name="python -m deidcli.research.train")
