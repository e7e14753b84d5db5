"""Inference that runs on every CPU: the probe that decides llama.cpp's optional fast paths."""
