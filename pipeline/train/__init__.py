"""Training loops (CLIP pretraining for the embedded default, Step-1, Step-2) and what they share."""
