"""Research studies built on the library: ``python -m lightning_ntk.studies.paper`` reproduces the
surrogate study of Engel et al. (ICLR 2024)."""
