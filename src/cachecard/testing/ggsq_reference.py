"""A second writer of llama.cpp sequence-state bytes: one ``struct.pack`` per field, in the order of the layout
in :mod:`cachecard.adapters.ggsq`'s docstring (llama.cpp's ``llama_kv_cache::state_write``).

``ggsq`` writes the same bytes into one preallocated buffer with vectorised cell records; the tests hold the
two to each other for arbitrary states. Slow (Python work per cell) and meant for tests only; it was
``SeqState.to_bytes`` before the buffer writer.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

IO_MAGIC = 0xAF143CD8  # llama_context's io_magic


def state_bytes(state: Any) -> bytes:
    """The bytes of a :class:`cachecard.adapters.ggsq.SeqState` (with the io header when ``seq_id`` is set)."""
    out: list[bytes] = []
    if state.seq_id is not None:
        out.append(struct.pack("<Ii", IO_MAGIC, state.seq_id))
    out.append(struct.pack("<I", len(state.streams)))
    for s in state.streams:
        if s is None:
            out.append(struct.pack("<I", 0))
            continue
        out.append(struct.pack("<I", s.cell_count))
        for i in range(s.cell_count):
            ids = s.seq_ids[i]
            out.append(struct.pack("<iI", int(s.positions[i]), len(ids)))
            if state.cell_ext_size:
                out.append(s.cell_ext[i])
            out.append(np.asarray(ids, "<i4").tobytes())
        out.append(struct.pack("<II", int(s.v_trans), len(s.k)))
        for rows in s.k:
            out.append(struct.pack("<iQ", rows.type_id, rows.size))
            out.append(rows.data.tobytes())
        for rows in s.v:
            if rows.transposed:
                out.append(struct.pack("<iII", rows.type_id, rows.size, rows.n_embd))
            else:
                out.append(struct.pack("<iQ", rows.type_id, rows.size))
            out.append(rows.data.tobytes())
    return b"".join(out)
