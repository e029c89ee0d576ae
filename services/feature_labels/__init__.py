"""feature-labels: NVIDIA's GPU feature discovery labels from the health bus, inside the plugin's pod."""

GATE = "GPU_PLUGIN_FEATURE_LABELS"  # "true": on (the chart's gfd.enabled); supervisord.conf's sh reads it first
# Every variable it reads besides the shared settings: the gate and NVIDIA's GFD names.
ENV = (GATE, "GFD_OUTPUT_FILE", "GFD_MACHINE_TYPE_FILE", "GFD_NO_TIMESTAMP")
