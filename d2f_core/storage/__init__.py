"""Files the engine writes and reads: ``files`` (atomic, never-clobbering safetensors writes, plain-name
rule, damaged-file errors) and ``state`` (resumable training state). Imports nothing else of the pack."""
