"""MeshNet itself: the model, its checkpoint format, pretrained weights and the fused inference pass."""
