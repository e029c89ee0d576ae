"""mps-control: runs and watches the NVIDIA MPS control daemons of sharing.mps."""
