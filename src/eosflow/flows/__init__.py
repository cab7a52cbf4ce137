"""Continuous-time models of the optimizers, as processes."""
