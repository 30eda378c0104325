"""Real agents that drive a live `mars serve`: trace replay over HTTP (`replay`), the CPU work their
tool steps run (`cpuwork`), the idle-server probe behind live ideal times (`probe`), and
mini-swe-agent on mars (`miniswe`) with the seeded tasks and the fleet runner of `mars bench
--agents` (`tasks`, `taskrun`)."""
