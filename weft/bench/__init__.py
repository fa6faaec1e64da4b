"""``weft bench``: measurements run inside the lab, compared side by side in one run."""
