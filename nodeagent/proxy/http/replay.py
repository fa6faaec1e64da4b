"""The request body an exchange keeps so that the retry stage can send it again."""

from __future__ import annotations


class ReplayBuffer:
    """Body chunks kept up to ``limit`` bytes (``chunks``); past the limit, or when bytes
    had already left unrecorded, ``chunks`` is None: the request cannot be replayed."""

    __slots__ = ("chunks", "limit", "size")

    def __init__(self, limit: int, held: list[bytes] | None, held_bytes: int) -> None:
        """``held``: the body read so far, all of it still here (None: some already left
        for an upstream before recording began)."""
        self.limit = limit
        self.size = held_bytes
        self.chunks: list[bytes] | None = (
            list(held) if held is not None and held_bytes <= limit else None
        )

    def add(self, data: bytes) -> None:
        if self.chunks is None:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.chunks = None
        else:
            self.chunks.append(data)

    @property
    def intact(self) -> bool:
        return self.chunks is not None
