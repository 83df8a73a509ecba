"""Training side of t2i-curate: schedules, text condition, tiny Kolors stand-ins and pipeline export."""
