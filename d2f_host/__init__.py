"""Host-side tools for the Diff2Flow Bridge pack: things that drive a real ComfyUI.

- ``d2f_host.workflow``: UI-format workflow files (as the frontend saves them) → API-format prompts,
  converted the way the frontend's ``graphToPrompt`` does, and checked against the host's node
  definitions. Pure Python: no ComfyUI import.
- ``d2f_host.host``: find a ComfyUI checkout and boot it in this process (or reuse the one already
  booted), the node definitions it serves as ``/object_info``.
- ``d2f_host.runner``: execute a workflow headlessly with the host's own validator and executor
  (``execution.validate_prompt`` / ``execution.PromptExecutor``), with a text progress bar.
- ``d2f_host.cli``: the ``d2f run WORKFLOW.json`` subcommand.
- ``d2f_host.frontend``: a real ComfyUI server and its frontend in headless Chromium (Playwright).
- ``d2f_host.examples`` / ``d2f_host.author``: the example workflows, built against the host's node
  definitions and saved through the real frontend (``python -m d2f_host.author``).

ComfyUI is imported only at run time, from the host that is found; ``d2f_core`` never imports this
package at import time.
"""

__all__ = ["workflow", "host", "runner", "cli", "frontend", "examples", "author"]
