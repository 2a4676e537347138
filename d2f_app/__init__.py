"""The application around the engine: the ``d2f`` command (``cli``: ``d2f demo``, ``d2f run``) and the
demo it runs on an embedded default — tiny UNets (``tiny_unet``) trained on the bundled digits
(``datasets``, ``assets/``), Fréchet distances (``metrics``), a labelled PNG grid (``png``). Uses
``d2f_core`` (the engine) and ``d2f_host`` (running ComfyUI headless); neither imports this package.
"""
