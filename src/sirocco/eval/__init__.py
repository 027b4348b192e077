"""Evaluations of a model on text: perplexity (perplexity.py)."""
from .perplexity import PerplexityResult, perplexity, windows

__all__ = ["PerplexityResult", "perplexity", "windows"]
