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
    write_slot_body(path, SeqState(state.streams, None, state.cell_ext_size).to_buffer(), tokens, version=version)


def write_slot_body(path: str | os.PathLike[str], body: np.ndarray | bytes, tokens: Sequence[int] | np.ndarray, *,
                    version: int = ggsq.SLOT_VERSION) -> None:
    """Write a slot file of ``tokens`` and ``body``, state bytes without the ``io_magic`` header (a
    :class:`SeqState` with ``seq_id=None``, as :func:`ggsq.allocate` lays it out), written as they are."""
    header = ggsq.slot_header(np.asarray(tokens), version=version)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(body)
    os.replace(tmp, path)
