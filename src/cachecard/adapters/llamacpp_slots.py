"""llama.cpp slot files (``llama_state_seq_save_file``, the server's ``/slots?action=save``) read and written
(spec/cachecard-1.md §4; the bytes are :mod:`cachecard.adapters.ggsq`'s). Needs no llama.cpp."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cachecard.adapters import ggsq
from cachecard.adapters.ggsq import SeqState


def read_slot_file(path: str | os.PathLike[str], *, cell_ext_size: int = 0) -> tuple[SeqState, np.ndarray]:
    """A llama.cpp slot file (``llama_state_seq_save_file``, the server's ``/slots?action=save``) as
    ``(state, tokens)``."""
    with open(path, "rb") as f:
        data = f.read()
    state, tokens, _version = ggsq.parse_slot_file(data, cell_ext_size=cell_ext_size)
    return state, tokens


def write_slot_file(path: str | os.PathLike[str], state: SeqState, tokens: Sequence[int] | np.ndarray, *,
                    version: int = ggsq.SLOT_VERSION) -> None:
    """Write a slot file that ``llama_state_seq_load_file`` (or the server's ``action=restore``) reads."""
    data = ggsq.slot_file_bytes(state, np.asarray(tokens), version=version)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
