"""ctxaware: fine-tuning and post-training recipes for attention-level methods on Hugging Face causal LMs."""

__version__ = "0.1.0"
