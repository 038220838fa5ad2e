"""Triton kernels, one op per file: the @triton.jit kernels, then the launcher.

No nn.Module and no autograd here; ``fusedmlp.ops`` wraps the launchers as custom ops.
"""
