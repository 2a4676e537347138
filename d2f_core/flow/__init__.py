"""The flow math (DESIGN §2): a discrete VP model read as a flow-matching model, in ComfyUI's coordinates.

``schedule`` (the VE sigma table ς_n and its exact fractional inverse), ``bridge`` (σ = ς/(1+ς),
x = (1-σ)·x_VE, network input x/D, x̂0 and v̂ from ε / v / x0 outputs), ``samplers`` (flow Euler ≡ DDIM),
``guidance`` (CFG and a flow-space rescale), ``losses`` (the Diff2Flow objective ‖v̂ − (ε − x0)‖², the
native one, and the flow-time draws). Pure torch; imports nothing of the pack outside this folder.
"""
