"""Links ``services/queue/queue.lua`` into one self-contained source per script (the queue registers
each with ``redis.register_script`` and runs it with EVALSHA)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources as importlib_resources
from typing import Any

from services.queue.keys import Keys

_LUA_DEF = re.compile(r"^local (?:function )?([A-Za-z_][A-Za-z0-9_]*)")
_LUA_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def lua_words(src: str) -> set[str]:
    """The identifiers ``src`` mentions outside ``--`` comments."""
    return set(_LUA_WORD.findall(re.sub(r"--[^\n]*", "", src)))


def lua_blocks(text: str) -> list[tuple[str, str]]:
    """Split Lua helpers into (defined name, source) blocks at column-0 ``local`` definitions;
    column-0 comments go with the definition that follows them."""
    blocks: list[list[Any]] = []
    comments: list[str] = []
    for line in text.splitlines():
        match = _LUA_DEF.match(line)
        if match:
            blocks.append([match.group(1), comments + [line]])
            comments = []
        elif line.startswith("--") or not blocks:
            comments.append(line)
        else:
            blocks[-1][1].append(line)
    return [(name, "\n".join(lines)) for name, lines in blocks]


def load_scripts(resource: str = "queue.lua") -> dict[str, str]:
    """Script name -> full source: the prelude's header, then only the helpers (and key
    functions) the body uses, transitively, then the body. Every EVALSHA re-creates the
    helpers it contains, so leaving unused ones out keeps the per-call overhead small.

    The file has one ``--!prelude`` section (a header, ``-- @@KEY_FUNCTIONS@@``, then helpers)
    and one ``--!script <name>`` section per script."""
    text = importlib_resources.files("services.queue").joinpath(resource).read_text(encoding="utf-8")
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("--!prelude"):
            current = "__prelude__"
            sections[current] = []
        elif line.startswith("--!script "):
            current = line.split(None, 1)[1].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    header, _, helpers = "\n".join(sections.pop("__prelude__")).partition("-- @@KEY_FUNCTIONS@@")
    blocks = lua_blocks(Keys.lua_functions() + helpers)
    scripts = {}
    for name, lines in sections.items():
        body = "\n".join(lines)
        needed = lua_words(body)
        included: set[str] = set()
        changed = True
        while changed:
            changed = False
            for block_name, src in blocks:
                if block_name in needed and block_name not in included:
                    included.add(block_name)
                    needed |= lua_words(src)
                    changed = True
        used = "\n".join(src for block_name, src in blocks if block_name in included)
        scripts[name] = f"{header}\n{used}\n{body}\n"
    return scripts


_SOURCES: dict[str, str] | None = None


def _sources() -> dict[str, str]:
    global _SOURCES
    if _SOURCES is None:
        _SOURCES = load_scripts()
    return _SOURCES


class Scripts:
    """The queue's Lua scripts on one client and key prefix, run with the common ARGV head of
    ``queue.lua`` (prefix, now, the caps): the one way every caller (the queue, the event log,
    the admission lock, a rank's attempt handle) runs a script."""

    def __init__(self, client: Any, keys: Keys, *, events_maxlen: int = 5000, dead_letter_max: int = 10_000,
                 notify_max: int = 1000, events_ttl: int = 14 * 86400) -> None:
        self.client = client
        self.keys = keys
        self.events_maxlen = int(events_maxlen)
        self.dead_letter_max = int(dead_letter_max)
        self.notify_max = int(notify_max)
        self.events_ttl = int(events_ttl)
        self._scripts: dict[str, Any] = {}

    def script(self, name: str) -> Any:
        """The registered script (``redis.commands.core.Script``), registered on first use."""
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.client.register_script(_sources()[name])
        return script

    def header(self) -> tuple[bytes, ...]:
        """The common ARGV head (see queue.lua), pre-encoded for pipelined hot paths."""
        return tuple(str(x).encode() for x in (self.keys.prefix, "", self.events_maxlen, self.dead_letter_max,
                                               self.notify_max, self.events_ttl))

    def run(self, name: str, args: Sequence[Any], now: float | None = None, client: Any = None) -> Any:
        argv = [self.keys.prefix, "" if now is None else repr(float(now)), self.events_maxlen,
                self.dead_letter_max, self.notify_max, self.events_ttl, *args]
        return self.script(name)(keys=[], args=argv, client=client)

    def queue_on(self, pipe: Any, name: str, header: tuple[bytes, ...], args: Sequence[Any]) -> None:
        """EVALSHA of ``name`` straight onto a pipeline; the pipeline loads the script first
        should the server not have it (NOSCRIPT)."""
        script = self.script(name)
        pipe.scripts.add(script)
        pipe.execute_command("EVALSHA", script.sha, 0, *header, *args)


__all__ = ["Scripts", "load_scripts", "lua_blocks", "lua_words"]
