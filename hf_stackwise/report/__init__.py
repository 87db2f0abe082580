"""What a run shows a person: the schedule and loss plots (``plots``) and the model card (``card``).

May import: data, errors, persist, schedule.
"""
