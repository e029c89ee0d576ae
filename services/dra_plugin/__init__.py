"""dra-plugin: the GPUs of this node through Kubernetes Dynamic Resource Allocation (NVIDIA's DRA driver's
names, `gpu.nvidia.com`), from the same health bus as the device plugin. Off unless DRA_ENABLED."""
