"""The README's commands name real commands and options; every command has help."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from vggembed.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def readme_invocations():
    """Every `vggembed ...` invocation in the README's shell blocks, as argument lists."""
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0]
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part, comments=True)
                if words and words[0] == "vggembed":
                    yield words[1:]


def resolve(args):
    cmd, rest = main, list(args)
    while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
        cmd = cmd.commands[rest.pop(0)]
    return cmd, rest


INVOCATIONS = list(readme_invocations())


def test_readme_shows_commands():
    assert len(INVOCATIONS) >= 10


@pytest.mark.parametrize("args", INVOCATIONS, ids=[" ".join(a)[:60] for a in INVOCATIONS])
def test_readme_command_and_options_exist(args):
    cmd, rest = resolve(args)
    assert not isinstance(cmd, click.Group), f"{args}: no such command"
    known = {opt for p in cmd.params for opt in p.opts + p.secondary_opts} | {"--help", "-h"}
    for word in rest:
        if word.startswith("-") and word != "-":
            assert word.split("=")[0] in known, f"vggembed {' '.join(args)}: unknown option {word}"


def test_every_command_has_help_text():
    def walk(group, prefix):
        for name, cmd in group.commands.items():
            assert cmd.help, f"{prefix}{name} has no help"
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix}{name} ")

    walk(main, "")


def test_readme_table_options_exist():
    """The option table in the README names options the commands have."""
    options = {p for cmd in (main.commands["embed"], main.commands["classify"]) for par in cmd.params
               for p in par.opts}
    table = README.split("The important ones:")[1].split("stdout carries")[0]
    for opt in re.findall(r"`(--[a-z0-9-]+)", table):
        assert opt in options, opt
