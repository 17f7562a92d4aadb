"""Policy models: the built-in tiny model and loading local Hugging Face model directories."""
