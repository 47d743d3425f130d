"""Budget: from a wall-clock promise to a plan (model shape, steps) measured on this hardware."""
