"""Networks of TRIS: CLIP encoders (``clip_backbone``), Step-1 localiser (``step1``), Step-2 segmenter."""
