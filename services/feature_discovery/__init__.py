"""gpu-feature-discovery: NVIDIA's GPU feature discovery labels for the node (an NFD features.d file)."""
