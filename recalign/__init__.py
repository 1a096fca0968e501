"""recalign: align seq2seq language models (T5 / FLAN-T5) with recommendation knowledge."""

__version__ = "0.1.0"
