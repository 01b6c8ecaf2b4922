"""Torch-free WaveCLIP runtime: preprocessing, bundle loading, backends and the early-exit cascade."""
