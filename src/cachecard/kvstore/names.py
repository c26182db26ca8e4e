"""The store's naming rules and layout constants (spec/store-1.md §1), and the disk-full error every part of
the store raises the same way."""

from __future__ import annotations

import errno
import os
import re
from typing import Callable

from cachecard.errors import AgentIdError, CardNotFoundError, StoreFullError

STORE_FILE = "cachecard-store.json"
STORE_VERSION = 1
DEFAULT_BLOCK_TOKENS = 64
# Checked with fullmatch: a ``$`` would match before a trailing newline ("a\n" would pass and name a directory).
AGENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
CARD_ID_RE = re.compile(r"[0-9a-f]{32}")
ATIME_RESOLUTION_S = 1.0    # last-access times (LRU) are kept to this resolution
_OPEN_CACHE = 64             # opened cards kept per Store (metadata and token ids only)
Progress = Callable[[int, int], None]


def check_agent(agent: object) -> str:
    """Return ``agent`` if it is a valid agent id, else raise :class:`AgentIdError` saying why."""
    if not isinstance(agent, str):
        raise AgentIdError(f"an agent id must be a string; got {type(agent).__name__} {agent!r}")
    if not AGENT_RE.fullmatch(agent):
        why = ("is empty" if not agent else "is longer than 128 characters" if len(agent) > 128
               else "holds a path separator" if "/" in agent or "\\" in agent
               else "holds a control character" if any(ord(ch) < 32 or ord(ch) == 127 for ch in agent)
               else "must start with a letter or digit and use only letters, digits and . _ @ + -")
        raise AgentIdError(f"agent id {agent!r} {why}; agent ids are 1-128 characters from [A-Za-z0-9._@+-], "
                           "starting with a letter or digit")
    return agent


def check_card_id(card_id: object) -> str:
    if not isinstance(card_id, str) or not CARD_ID_RE.fullmatch(card_id):
        raise CardNotFoundError(f"{card_id!r} is not a card id (32 lowercase hex digits); list cards with "
                                "`cachecard ls`")
    return card_id


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def os_error(e: OSError, what: str) -> Exception:
    """``e`` as a :class:`StoreFullError` when the disk is full (else ``e`` itself), saying what failed."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFullError(f"{what}: the disk is full ({e.strerror}). Free space, or evict cards "
                              "(`Store.evict`, `cachecard gc`); nothing committed before was lost")
    return e
