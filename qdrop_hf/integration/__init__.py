"""The transformers integration: the ``qdrop`` HfQuantizer, the packed save format, the Hub, the model card."""
