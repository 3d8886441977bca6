"""megacpt: continued pre-training of Hugging Face decoder LMs."""

__version__ = "0.1.0"
