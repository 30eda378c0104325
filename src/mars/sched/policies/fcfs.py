"""`fcfs`: vLLM V1's default scheduler, decision for decision.

Source: vLLM `vllm/v1/core/sched/scheduler.py` (`SchedulingPolicy.FCFS`) and
`vllm/v1/core/kv_cache_manager.py` / `block_pool.py`:
- waiting requests in arrival order; a preempted request goes back to the front;
- chunked prefill: each step is filled with running requests first, then waiting ones, up to the
  token budget; the first waiting request that does not fit stops the fill;
- when KV runs out for a running request, the most recently scheduled running request is
  preempted by recompute (its blocks freed, `num_computed_tokens` reset);
- finished requests free their blocks, which stay reusable as prefix cache, evicted LRU (tail
  blocks of a sequence first);
- no admission control: every session is admitted at once.
`BasePolicy` already implements each of these; `fcfs` is the name for it.
"""

from __future__ import annotations

from mars.sched.policy import BasePolicy


class FCFSPolicy(BasePolicy):
    name = "fcfs"
