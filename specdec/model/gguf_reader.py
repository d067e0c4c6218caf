"""A GGUF reader for weights: the `gguf` package's GGUFReader, minus its per-element parse of
metadata arrays.

The stock reader builds a numpy view for every element of every metadata array. A Qwen2.5 GGUF
carries its tokenizer as two arrays of 151 936 strings each, so opening one file took about 12 s
on the dev VM, at every start that reads a GGUF (measured with cProfile: 24.5 s of a 36 s engine
start for the default pair). Loading weights never reads those arrays (the tokenizer comes from
the converted entry's tokenizer.json), so this reader skips each array in one pass over its
string lengths and keeps only its element type and count. Scalar and string fields, the tensor
infos and the tensors' data are the stock reader's, unchanged.
"""

from __future__ import annotations

import numpy as np

_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9  # gguf.GGUFValueType


def open_gguf(path: str):
    """A gguf.GGUFReader over `path` whose array fields hold [item type, count] only: their
    `contents()` is not available (nothing in the weight loader reads them)."""
    from gguf import GGUFReader, GGUFValueType

    class WeightsReader(GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != _ARRAY or self.byte_order == "S":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype, count = int(raw_itype[0]), int(alen[0])
            offs = orig_offs + 12
            if itype == _STRING:
                data = memoryview(self.data)
                for _ in range(count):  # NOTE: little-endian u64 length, then the bytes
                    offs += 8 + int.from_bytes(data[offs:offs + 8], "little")
            elif itype in _FIXED_SIZES:
                offs += _FIXED_SIZES[itype] * count
            else:  # nested arrays: the stock element-by-element walk
                return super()._get_field_parts(orig_offs, raw_type)
            return (offs - orig_offs, [raw_itype, alen], [],
                    [GGUFValueType.ARRAY, GGUFValueType(itype)])

    return WeightsReader(path)
