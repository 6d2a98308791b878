"""GPU kernels used to check the partitioning (importable without a GPU or Triton)."""
