"""Hand-written GPU kernels of the sparse engine (Triton; imported lazily, only by the backends that use them)."""
