"""The merge engine: exact delta-space merging of LoRA adapters, streamed, with a method registry and a CLI.

``methods`` (the registry, pure tensor math), ``lowrank`` (exact and randomized re-factorisation), ``sparsify``
(exact top-k and seeded DARE masks), ``safetensors_io`` and ``adapters`` (reading and writing), ``engine`` (the
streaming merge and its report), ``config`` and ``cli`` (``merge-local CONFIG OUT``).
"""
