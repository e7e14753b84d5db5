"""LoRA adapters over the one base model: file checks, the versioned store, the loaded-adapter cache, personalities."""
