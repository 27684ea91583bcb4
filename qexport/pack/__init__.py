"""Bit-packed files for small devices: N-bit packing, the packed container, C99 export."""
