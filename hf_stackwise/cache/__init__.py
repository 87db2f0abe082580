"""The frozen-prefix activation cache: which phases it may serve and why (``policy``) and the store with the
trainer's replay (``activations``; under DDP one store per node, ``node``).

May import: errors, data, persist, schedule.
"""
