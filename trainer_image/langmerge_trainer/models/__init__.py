"""Real pretrained models that ship inside packages, converted to Hugging Face folders (no model hub needed)."""
