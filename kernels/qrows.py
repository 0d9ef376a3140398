"""Quantized neuron rows for the GPU side's kernels: GGUF blocks split into code and scale arrays.

A GGUF row of Q4_0 / Q4_1 / Q8_0 blocks interleaves 2-4 bytes of fp16 scale with 16 or 32 bytes of codes
(18-34-byte blocks), which a GPU cannot load as aligned vectors. `QRows` holds the same numbers split, one
row per neuron (losslessly: `from_quant` moves bytes, nothing is re-rounded):
- `codes`: uint8 [I, H/2] (4-bit: per 32 weights 16 bytes, low nibbles weights 0-15, high 16-31, as in a
  GGUF block) or int8 [I, H] (Q8_0);
- `scales` fp16 [I, H/32], and `mins` fp16 [I, H/32] (Q4_1 only).
Dequantized as GGML does: Q4_0 d * (q - 8), Q4_1 d * q + m, Q8_0 d * q (fp32).

The kernels (kernels/triton_ffn.py) read the codes and scales and dequantize in registers, so the rows cost
their quantized bytes in GPU memory and bandwidth. A dense matrix held this way (attention's projections,
the head on a GPU) is the gathered product over all its rows (kernels.quantized_linear). The other backends
take the rows through `__getitem__` (dequantized fp32 rows), which is what kernels/reference.py indexes: the
quantized rows behave there as fp32 weights with those values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import SPLIT_TYPES, QuantTensor, Stored, split_blocks, split_values


@dataclass
class QRows(Stored):
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    qtype: str

    dtype = torch.float32  # what products over these rows compute in (kernels.reference's rule)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.scales.shape[1] * 32)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scales, self.mins) if t is not None]

    def dim(self) -> int:
        return 2

    def to(self, device: torch.device | str) -> QRows:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QRows(move(self.codes), move(self.scales), move(self.mins), self.qtype)

    def select(self, idx: torch.Tensor) -> QRows:
        """Rows idx, still quantized (one side's share of the neurons)."""
        idx = idx.to(self.codes.device)
        pick = lambda t: None if t is None else t.index_select(0, idx).contiguous()  # noqa: E731
        return QRows(pick(self.codes), pick(self.scales), pick(self.mins), self.qtype)

    def dequantize(self) -> torch.Tensor:
        """fp32 [I, H], exactly as GGML dequantizes the blocks these rows came from."""
        per_weight = lambda t: None if t is None else t.repeat_interleave(32, dim=1)  # noqa: E731
        return split_values(self.codes, per_weight(self.scales), per_weight(self.mins), self.qtype)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.select(idx.long()).dequantize()

    def all_ids(self) -> torch.Tensor:
        """0..rows-1 on the rows' device (made once): a dense product is the gathered one over every row."""
        ids = self.__dict__.get("_all_ids")
        if ids is None or ids.device != self.codes.device:
            ids = self.__dict__["_all_ids"] = torch.arange(self.shape[0], device=self.codes.device)
        return ids


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one row of `cols` weights as QRows holds it (codes, fp16 scales, and mins for Q4_1)."""
    blocks = cols // 32
    return blocks * ((32 if qtype == "Q8_0" else 16) + (4 if qtype == "Q4_1" else 2))


def supported(w: object) -> bool:
    return isinstance(w, QuantTensor) and w.qtype in SPLIT_TYPES


def from_quant(w: QuantTensor) -> QRows:
    """A QuantTensor's rows (GGUF blocks, or tiles) as QRows: the same numbers, bytes moved."""
    if not supported(w):
        raise ValueError(f"quantized GPU rows take {', '.join(SPLIT_TYPES)}; got "
                         f"{w.qtype if isinstance(w, QuantTensor) else type(w).__name__}")
    return QRows(*split_blocks(w), w.qtype)
