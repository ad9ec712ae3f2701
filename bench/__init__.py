"""fastpool's benchmark harness: fastpool's back ends against PyTorch on the same arrays."""
