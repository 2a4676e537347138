"""Files the engine writes and reads: ``files`` (atomic, never-clobbering safetensors writes, plain-name
rule, damaged-file errors), ``state`` (resumable training state) and ``metadata`` (the ``modelspec.*`` /
``diff2flow.*`` keys that make every written file self-describing). Imports nothing else of the pack."""
