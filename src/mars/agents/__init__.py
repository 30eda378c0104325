"""Real agents that drive a live `mars serve`: trace replay over HTTP (`replay`), the CPU work their
tool steps run (`cpuwork`), and the idle-server probe behind live ideal times (`probe`)."""
