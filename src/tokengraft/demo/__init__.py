"""The embedded default: a tiny real LLaVA (SmolLM2-135M + small CLIP tower) and synthetic data."""
