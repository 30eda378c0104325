"""The MARS gateway: the control plane (session identity, admission, load balancing) in front of
upstream OpenAI-compatible servers (`mars serve --engine vllm|openai --upstream URL ...`).

`upstreams.py`: health, the scraped GPU signal, sticky routing. `control.py`: sessions,
admission, the policy's KV view. `proxy.py`: forwarding and relaying. `app.py`: the routes.
"""
