"""Files: atomic writes, mask files, Hugging Face export."""
