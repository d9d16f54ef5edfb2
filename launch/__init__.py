"""Single- and multi-node launcher for SGLang with the MadaKV plugin (installed as ``madakv_sglang.launch``).

Not built yet: it arrives with the tensor-parallel / multi-node work. Until then, start servers directly with
``python -m sglang.launch_server ...`` (README, "Serving").
"""
