"""feature-labels: NVIDIA's GPU feature discovery labels from the health bus, inside the plugin's pod."""
