"""Bit-packing of integer weight codes (2..8 bits) into bytes, and back.

Codes are laid out as one bit stream, most significant bit first, so 3-bit codes take 3/8 of a byte
each, exactly as 2-, 4- and 8-bit codes take 1/4, 1/2 and 1.
"""
import numpy as np
import torch


def pack_codes(codes: torch.Tensor, n_bits: int) -> torch.Tensor:
    """uint8 codes (< 2**n_bits), any shape -> 1-D uint8 tensor of ceil(numel * n_bits / 8) bytes."""
    flat = codes.detach().cpu().reshape(-1).numpy().astype(np.uint8)
    if flat.size and int(flat.max()) >= 2**n_bits:
        raise ValueError(f"a code does not fit in {n_bits} bits")
    bits = np.unpackbits(flat[:, None], axis=1)[:, 8 - n_bits:]
    return torch.from_numpy(np.packbits(bits.reshape(-1)))


def unpack_codes(packed: torch.Tensor, n_bits: int, shape) -> torch.Tensor:
    """Inverse of ``pack_codes``: the uint8 codes in ``shape``."""
    numel = int(np.prod(shape))
    bits = np.unpackbits(packed.cpu().numpy().astype(np.uint8))[: numel * n_bits].reshape(numel, n_bits)
    full = np.zeros((numel, 8), dtype=np.uint8)
    full[:, 8 - n_bits:] = bits
    return torch.from_numpy(np.packbits(full, axis=1).reshape(shape))
