"""Discrete-prompt methods for text-only APIs (BDPL, CMA-ES over tokens) and their vocabulary."""
