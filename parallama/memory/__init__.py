"""What the machine has, and what to do about it: memory probes (psutil, cgroup, NVML), the start-up
plan (sequences, KV cells, the seq_id layout, RAM for the prefix cache's host tier), and the
degradation controller. Pure decisions over readings: no llama_cpp, no batching, no HTTP.
"""
