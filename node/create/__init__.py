"""`mirador create`: a personality from a sentence and some example files (sources, synthesis, keywords)."""
