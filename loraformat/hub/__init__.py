"""Publishing and fetching adapters: the Hugging Face Hub (through huggingface_hub) and the embedded local hub."""
