"""mars: co-scheduler for agentic LLM serving."""

__version__ = "0.1.0"
