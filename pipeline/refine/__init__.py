"""Response map -> pseudo-mask refinement: IRN's confident CRF seeds, boundary-based inter-pixel affinity,
random-walk propagation, and the final thresholding (Sec. 3.4, "Segmentation")."""
