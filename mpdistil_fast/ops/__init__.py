"""Op layer: torch.library custom ops (fake kernels + registered autograd) and the plain-torch references."""
