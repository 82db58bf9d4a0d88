"""Evaluation of encoders. Offline, on a frozen encoder after pretraining
(ssl_jax/evaluate.py runs them): features (extraction, pooling, cache), linear,
knn, mlp, lowshot; report (tables and figures from their records). Online,
during pretraining: online (online_linear / online_knn probes)."""
