"""nn.Module wrappers of the fused ops (they hold configuration and parameters)."""
