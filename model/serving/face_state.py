"""The face-state wire format: what a later neutral or residue render needs of a
face of a /predict, kept by the service (in process, or in Redis) under its
face_id. A small header + zlib'd raw bytes: never pickle anything that goes to Redis."""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass
class FaceState:
    """What a later neutral/residue render needs: the aligned face, the 150×150
    identity chip (grayscale, the model sees no colour) and, for the editing
    renderer, the larger crop it edits. Serialised as a small header + zlib'd raw
    bytes: never pickle anything that goes to Redis."""
    aligned: np.ndarray              # (S,S) uint8
    chip: np.ndarray                 # (150,150) uint8
    large: np.ndarray | None = None  # (R,R) uint8, same alignment as `aligned`

    MAGIC = b"IPDF2"

    def to_bytes(self) -> bytes:
        s, c = self.aligned.shape[0], self.chip.shape[0]
        r = 0 if self.large is None else self.large.shape[0]
        raw = b"".join(np.ascontiguousarray(a).tobytes() for a in (self.aligned, self.chip, self.large)
                       if a is not None)
        # level 1: 0.8 vs 1.2 ms a face at level 6, the same ~30 KB (camera noise barely compresses)
        return self.MAGIC + struct.pack("<HHH", s, c, r) + zlib.compress(raw, 1)

    @classmethod
    def from_bytes(cls, data: bytes) -> FaceState:
        if not data.startswith(cls.MAGIC):
            raise ValueError("not a FaceState")
        s, c, r = struct.unpack_from("<HHH", data, len(cls.MAGIC))
        raw = zlib.decompress(data[len(cls.MAGIC) + 6:])
        if len(raw) != s * s + c * c + r * r:
            raise ValueError("corrupt FaceState")
        aligned = np.frombuffer(raw[:s * s], np.uint8).reshape(s, s)
        chip = np.frombuffer(raw[s * s:s * s + c * c], np.uint8).reshape(c, c)
        large = np.frombuffer(raw[s * s + c * c:], np.uint8).reshape(r, r) if r else None
        return cls(aligned=aligned, chip=chip, large=large)
