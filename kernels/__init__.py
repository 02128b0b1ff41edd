"""Triton kernels (installed as ``mpdistil_fast.kernels``).  Kernel source only: no argument policy here.

Import these modules only after deciding to run Triton: importing triton is slow, and on CPU the kernels run
only when ``TRITON_INTERPRET=1`` was set before triton was first imported.
"""
