"""Public functional API of the fused ops: argument checks, backend choice, then the op."""
