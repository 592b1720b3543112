"""reranker: a self-hosted reranking and embedding inference server."""

__version__ = "0.1.0"
