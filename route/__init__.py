"""route: a small from-scratch PyTorch implementation of ROUTE (Qin et al., ICLR 2025)."""

__version__ = "0.1.0"
