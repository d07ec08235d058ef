"""A Click group whose research commands load on first use.

The product never imports ``deidcli.research``: those commands are named here by import string
("module:attribute") with a static one-line help, so ``deid --help`` lists them without
importing anything, and ``deid train ...`` imports its module only when it runs.
"""

from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """``lazy``: {command name: ("package.module:attribute", "short help for deid --help")}."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy and name not in self.commands:
            target = self.lazy[name][0]
            mod, attr = target.split(":")
            cmd = getattr(importlib.import_module(mod), attr)
            if not isinstance(cmd, click.Command):
                raise TypeError(f"{target} is not a click.Command")
            self.add_command(cmd, name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        """Click's listing, with the lazy commands' static help (nothing imported)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            if name in self.commands:
                cmd = self.commands[name]
                if cmd.hidden:
                    continue
                rows.append((name, cmd.get_short_help_str(limit)))
            else:
                rows.append((name, click.Command(name, help=self.lazy[name][1]).get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
