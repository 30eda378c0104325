"""mini-swe-agent on mars: its LiteLLM model pointed at `mars serve`, and an environment whose
commands run through the tools API of the same session, sandboxed in the session's workspace.

    target = MarsTarget(base_url="http://127.0.0.1:8000", session_id=new_session_id())
    config = bundled_config("mini")
    env = MarsEnvironment(target, **config["environment"])
    env.seed(Path("/abs/path/of/repo"))       # a path on the server's machine
    model = MarsModel(target, **config["model"])
    agent = DefaultAgent(model, env, **config["agent"] | {"step_limit": 3})
    agent.run("Fix the failing test")
    env.end_session()

Both halves send the one session id, so mars sees each turn and each command of the agent as
one session's GPU and CPU phases. Written against mini-swe-agent 2.4.6 (the `agents` extra):
`Model.query(messages)` and `Environment.execute(action, cwd, timeout=...)`.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from mars.tools.category import categorize

# Read at import by litellm and mini-swe-agent: no network fetch of the cost map, no banner.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")

try:
    import litellm
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.config import builtin_config_dir, get_config_from_spec
    from minisweagent.exceptions import Submitted
    from minisweagent.models.litellm_model import LitellmModel
    from minisweagent.utils.serialize import recursive_merge
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        f"mars.agents.miniswe needs mini-swe-agent ({e.name} is missing): "
        "pip install -e '.[agents]' (or scripts/setup.sh --dev)"
    ) from e

__all__ = [
    # DefaultAgent and Submitted are re-exported: importing mini-swe-agent through this module
    # sets its environment first (no banner, no network fetch).
    "DefaultAgent",
    "MarsEnvironment",
    "MarsModel",
    "MarsTarget",
    "Submitted",
    "bundled_config",
    "new_session_id",
]

# The model name mars answers to does not matter; the `openai/` prefix makes LiteLLM speak the
# OpenAI protocol to `api_base`.
MODEL_NAME = "openai/mars"
SUBMIT_MARKER = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"  # mini-swe-agent's end-of-task output
# Time a tool request may wait for a worker on a busy server, on top of the command's timeout.
QUEUE_SLACK_S = 300.0

litellm.suppress_debug_info = True  # an unknown model's cost lookup prints a provider list


class MarsTarget(BaseModel):
    """Which server and which session: shared by the model and the environment."""

    base_url: str = "http://127.0.0.1:8000"  # without /v1
    session_id: str
    api_key: str | None = None  # `mars serve --api-key`; None: MARS_API_KEY or no key

    def headers(self) -> dict[str, str]:
        key = self.api_key or os.environ.get("MARS_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def url(self, path: str) -> str:
        return f"{self.base_url.rstrip('/')}{path}"


def new_session_id(prefix: str = "miniswe") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def bundled_config(name: str = "mini") -> dict[str, dict[str, Any]]:
    """One of mini-swe-agent's bundled configs ("mini": tool calls), by section: `agent`
    (templates, limits: `DefaultAgent(**...)`), `model` (`MarsModel(target, **...)`) and
    `environment` (`MarsEnvironment(target, **...)`)."""
    choices = sorted(p.stem for p in Path(builtin_config_dir).glob("*.yaml"))
    if name not in choices:
        raise ValueError(f"no bundled mini-swe-agent config {name!r}: choose one of {choices}")
    loaded = get_config_from_spec(name)
    sections = {key: dict(loaded.get(key) or {}) for key in ("agent", "model", "environment")}
    sections["agent"].pop("mode", None)  # the interactive agent's setting, not DefaultAgent's
    return sections


class MarsModel(LitellmModel):
    """mini-swe-agent's LiteLLM model on `mars serve`, the session id on every request.

    The id goes in the body (`session_id`) and as `X-Session-ID`. No call carries `is_last_step`:
    the agent runs the last call's command after it, and mars removes a session's workspace when
    the session ends, so `MarsEnvironment.end_session()` ends it once the run is over.
    `tool_choice` is "required": the agent rejects a reply without a bash call anyway, and mars
    then constrains the output to a valid call.
    """

    def __init__(self, target: MarsTarget, **kwargs: Any) -> None:
        given: dict[str, Any] = kwargs.pop("model_kwargs", {})
        model_kwargs = {
            "api_base": target.url("/v1"),
            "api_key": target.api_key or os.environ.get("MARS_API_KEY") or "none",
            "tool_choice": "required",
            "temperature": 0.0,
            **given,
            # Merged, not replaced: a caller's own extra fields keep the session id beside them.
            "extra_body": {**given.get("extra_body", {}), "session_id": target.session_id},
            "extra_headers": {**given.get("extra_headers", {}), "X-Session-ID": target.session_id},
        }
        kwargs.setdefault("model_name", MODEL_NAME)
        kwargs.setdefault("cost_tracking", "ignore_errors")  # mars is not in LiteLLM's price list
        super().__init__(model_kwargs=model_kwargs, **kwargs)
        self.target = target


class MarsEnvironmentConfig(BaseModel):
    cwd: str = ""  # where commands start; "": the workspace (/work in the sandbox)
    env: dict[str, str] = {}  # exported before each command (mini-swe-agent's configs set PAGER)
    timeout: int = 30  # seconds per command, unless `execute` is given one


class MarsEnvironment:
    """Runs each command with `POST /v1/sessions/{id}/tools` in the session's workspace.

    Returns what `LocalEnvironment` returns: `output` (stdout, then stderr), `returncode`,
    `exception_info`; a timeout or a failed request gives returncode -1 and the exception's text,
    as `subprocess.TimeoutExpired` would locally. mars's own fields go in `extra`.
    """

    def __init__(
        self, target: MarsTarget, client: httpx.Client | None = None, **kwargs: Any
    ) -> None:
        self.target = target
        self.config = MarsEnvironmentConfig(**kwargs)
        self.client = client or httpx.Client(headers=target.headers())

    def execute(
        self, action: dict[str, Any], cwd: str = "", *, timeout: int | None = None
    ) -> dict[str, Any]:
        command = str(action.get("command", ""))
        try:
            output = self._run(command, cwd or self.config.cwd, timeout or self.config.timeout)
        except (httpx.HTTPError, ValueError) as e:
            output = _failure(e, "")
        self._check_finished(output)
        return output

    def _run(self, command: str, cwd: str, timeout: int) -> dict[str, Any]:
        prefix = "".join(f"export {k}={shlex.quote(v)}; " for k, v in self.config.env.items())
        if cwd:
            prefix += f"cd {shlex.quote(cwd)} && "
        body = {
            "command": prefix + command,
            "timeout_s": timeout,
            "name": categorize(command),  # the agent's command, not the exports in front of it
        }
        r = self.client.post(
            self.target.url(f"/v1/sessions/{self.target.session_id}/tools"),
            json=body,
            timeout=httpx.Timeout(10.0, read=timeout + QUEUE_SLACK_S),
        )
        if r.status_code != 200:
            raise ValueError(f"mars answered {r.status_code} to the tool run: {_error_text(r)}")
        result: dict[str, Any] = r.json()
        text = result["stdout"] + result["stderr"]
        if result["truncated"]:
            text += "\n[mars cut this output at its output cap]\n"
        mars = {
            k: result[k] for k in ("exit_code", "timed_out", "truncated", "queue_wait_s", "run_s")
        }
        if result["timed_out"]:
            failed = _failure(subprocess.TimeoutExpired(command, timeout), text)
            failed["extra"] |= mars
            return failed
        return {
            "output": text,
            "returncode": result["exit_code"],
            "exception_info": "",
            "extra": mars,
        }

    def _check_finished(self, output: dict[str, Any]) -> None:
        """Raise `Submitted` as mini-swe-agent's own environments do."""
        lines = output.get("output", "").lstrip().splitlines(keepends=True)
        if lines and lines[0].strip() == SUBMIT_MARKER and output["returncode"] == 0:
            submission = "".join(lines[1:])
            raise Submitted(
                {
                    "role": "exit",
                    "content": submission,
                    "extra": {"exit_status": "Submitted", "submission": submission},
                }
            )

    def seed(self, source: Path | str) -> None:
        """Copy a directory (or unpack an archive) into the workspace: a path on the server."""
        path = Path(source).resolve()
        r = self.client.post(
            self.target.url(f"/v1/sessions/{self.target.session_id}/workspace"),
            json={"seed": str(path)},
            timeout=120.0,
        )
        if r.status_code != 200:
            raise RuntimeError(f"mars refused to seed from {path}: {_error_text(r)}")

    def end_session(self) -> None:
        """End the session on mars (KV and workspace); one already ended is fine."""
        sid = self.target.session_id
        for path in (f"/v1/sessions/{sid}/workspace", f"/v1/sessions/{sid}"):
            r = self.client.delete(self.target.url(path), timeout=30.0)
            if r.status_code not in (200, 404):
                raise RuntimeError(f"mars refused DELETE {path}: {_error_text(r)}")

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        # The prompts name the OS; the server is a Linux machine like this one, seen from here.
        merged: dict[str, Any] = recursive_merge(
            self.config.model_dump(), platform.uname()._asdict(), kwargs
        )
        return merged

    def serialize(self) -> dict[str, Any]:
        return {
            "info": {
                "config": {
                    "environment": self.config.model_dump(mode="json")
                    | self.target.model_dump(mode="json", exclude={"api_key"}),
                    "environment_type": f"{type(self).__module__}.{type(self).__name__}",
                }
            }
        }


def _failure(e: Exception, output: str) -> dict[str, Any]:
    """What mini-swe-agent's local environment returns when running a command raised `e`."""
    return {
        "output": output,
        "returncode": -1,
        "exception_info": f"An error occurred while executing the command: {e}",
        "extra": {"exception_type": type(e).__name__, "exception": str(e)},
    }


def _error_text(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:500]
