"""Offline evaluators of frozen encoders: features (extraction), linear (probe), knn."""
