"""Offline evaluation: pure metrics, the chunked full-ranking kernel, the item-embedding cache,
one results format (``metrics.json`` + ``per_user.npz``) and evaluating a saved checkpoint."""
