"""The sandboxed tool runtime behind `POST /v1/sessions/{id}/tools`.

`cpus` parses CPU lists, `category` classes a command as the traces do, `sandbox` builds the
bubblewrap command line and its limits, `runner` runs one process under a timeout with capped
output, `workspace` holds the sessions' directories, and `runtime` ties them to a CPU worker pool.
"""
