"""Every capsctl option explains itself: walks the real click command tree and renders each
option's help line as ``capsctl CMD --help`` prints it."""

from __future__ import annotations

import re
from collections.abc import Iterator

import click

from services.cli import main
from services.cli.options import NumberList

# How a rendered help line states a numeric range: ``1..1000``, ``(0, 1]``, ``[-180, 180]``,
# ``0 or 1``, or click's own ``[1<=x<=64]`` / ``[x>=0]`` for IntRange and FloatRange.
RANGE = re.compile(r"\d\.\.\d|[\[(]-?[\d.]+, -?[\d.]+[\])]|\b0 or 1\b|x\s*[<>]=|<=\s*x")
NUMERIC = (click.types.IntParamType, click.types.FloatParamType, NumberList)


def options(command: click.Command, path: str = "capsctl") -> Iterator[tuple[str, click.Option, str]]:
    """(command path, option, its rendered help text) for every visible option of the tree."""
    ctx = click.Context(command, info_name=path)
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            record = param.get_help_record(ctx)
            yield path, param, record[1] if record else ""
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from options(sub, f"{path} {name}")


def test_every_option_has_help_and_numbers_show_their_range() -> None:
    seen = list(options(main))
    assert len({path for path, _, _ in seen}) > 15  # the whole tree was walked, not just the group
    missing = [f"{path} {max(o.opts, key=len)}" for path, o, _ in seen if not (o.help or "").strip()]
    assert missing == []
    no_range = [f"{path} {max(o.opts, key=len)}: {text}" for path, o, text in seen
                if isinstance(o.type, NUMERIC) and not RANGE.search(text)]
    assert no_range == []
    # Spot checks that the ranges are the spec's own limits, not made up here.
    rendered = {f"{path} {max(o.opts, key=len)}": text for path, o, text in seen}
    assert "1..1000; default 10" in rendered["capsctl submit --epochs"]
    assert "(0, 1]" in rendered["capsctl submit --lr"]
    assert "1..64" in rendered["capsctl submit --cpu-ranks"]
    assert "1<=x<=10000" in rendered["capsctl dead-letters --limit"]
