"""The sandboxed tool runtime behind `POST /v1/sessions/{id}/tools`.

`cpus` parses CPU lists, `category` classes a command as the traces do, `sandbox` builds the
bubblewrap command line and its limits, `runner` runs one process under a timeout with capped
output, `usage` reads what a run holds and `supervisor` kills one past its memory, process or disk
limit, `workspace` holds the sessions' directories, and `runtime` ties them to a CPU worker pool.
"""
